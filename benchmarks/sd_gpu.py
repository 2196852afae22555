#!/usr/bin/env python3
"""Full-size SD1.5 (random weights, seeded; 512x512) on CUDA with mlcweb beside PyTorch fp16 eager and
torch.compile, stage by stage and for a whole 20-step image (``sd_bench.py`` says what is measured).

On the GPU machine, after ``source .dev/tvm-b/activate.sh && source benchmarks/gpu_env.sh``
(benchmarks/README.md)::

    python3 benchmarks/sd_gpu.py --results $OUT              # float16, sm_90, shipped database
    python3 benchmarks/sd_gpu.py --no-db --results $OUT      # default schedules only
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sd_bench import main

if __name__ == "__main__":
    sys.exit(main(None, __doc__ or "", target="cuda", dtype="float16", latent_size=0, repeat=20))

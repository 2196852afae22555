#!/usr/bin/env python3
"""SD1.5 on the CPU (llvm) with mlcweb beside PyTorch CPU eager and torch.compile (``sd_bench.py`` says
what is measured). The default is the full SD1.5 architecture at latent 32 (256x256 images) in float32,
so a 2-core machine finishes in minutes; ``--size tiny`` is ``make demo``'s model::

    .venv/bin/python benchmarks/sd_cpu.py                       # SD1.5 architecture, 256x256
    .venv/bin/python benchmarks/sd_cpu.py --size tiny --no-db   # the demo model, default schedules
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sd_bench import main

if __name__ == "__main__":
    sys.exit(main(None, __doc__ or "", target="llvm", dtype="float32", latent_size=32, repeat=5))

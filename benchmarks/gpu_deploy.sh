#!/usr/bin/env bash
# Full-size SD1.5 on the GPU machine: build.py for cuda (float16), then deploy.py with both schedulers.
# Run from the repository root after `source .dev/tvm-b/activate.sh` (see benchmarks/README.md).
set -u
source "$(dirname "$0")/gpu_env.sh"  # build.py finds plugins through entry points
python3 -m mlcweb.cli list
start=$(date +%s)
python3 examples/stable_diffusion/build.py --target cuda --size full --dtype float16 --out /tmp/sd15-cuda 2>&1 | grep -v "Warning\|warn(\|params_shard" | tail -14
echo "build.py wall: $(( $(date +%s) - start )) s"
for s in dpm pndm; do
  python3 examples/stable_diffusion/deploy.py --artifacts /tmp/sd15-cuda --prompt "a lighthouse on a cliff at dusk" \
    --steps 20 --scheduler $s --output $OUT/deploy_cuda_${s}20.png 2>&1 | grep -v "denoising\|Warning" | tail -6
done
nvidia-smi --query-gpu=memory.used --format=csv

#!/usr/bin/env python3
"""Build Stable Diffusion with mlcweb: the same as ``mlcweb build stable-diffusion ...``.

python examples/stable_diffusion/build.py                       # tiny model, llvm, dist/llvm
python examples/stable_diffusion/build.py --target cuda --model ~/sd-v1-5 --dtype float16
python examples/stable_diffusion/build.py --target cuda --size full   # SD1.5 architecture, random weights
python examples/stable_diffusion/build.py --target webgpu --variant sd-turbo   # tiny SD-Turbo for the page
python examples/stable_diffusion/build.py --model ~/sd-v1-5 --lora ~/loras/watercolor.safetensors:0.8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlcweb_stable_diffusion import MODEL_NAME
from mlcweb_stable_diffusion.variants import VARIANTS

from mlcweb import BuildOptions
from mlcweb.choices import DTYPES
from mlcweb.cli import build_and_report, run_command
from mlcweb.targets import TARGETS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="llvm", choices=list(TARGETS))
    parser.add_argument("--out", type=Path, help="artifact directory (default dist/<target>)")
    parser.add_argument(
        "--model", type=Path, help="local diffusers folder, any SD 1.x / 2.x / XL (default: the tiny random model)"
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"], help="random-weight size without --model")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="fuse a LoRA (.safetensors, diffusers or kohya format) into the UNet and text encoders; repeatable",
    )
    parser.add_argument(
        "--variant", default="sd1.5", choices=list(VARIANTS), help="which model random weights are built as"
    )
    parser.add_argument("--db", type=Path, help="MetaSchedule database to apply")
    parser.add_argument("--arch", help="cuda architecture (default sm_90)")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument(
        "--plan-memory",
        action="store_true",
        help="print the weights and planned memory of each function and the peak, and stop (nothing written)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    options = BuildOptions(
        target=args.target,
        out=args.out or Path("dist") / args.target,
        model_path=args.model,
        dtype=args.dtype,
        database=args.db,
        use_cache=not args.no_cache,
        config={"size": args.size, "variant": args.variant, "lora": args.lora},
        arch=args.arch,
    )
    return run_command(lambda: build_and_report(MODEL_NAME, options, plan_only=args.plan_memory), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Build Stable Diffusion with mlcweb: the same as ``mlcweb build stable-diffusion ...``.

python examples/stable_diffusion/build.py                       # tiny model, llvm, dist/llvm
python examples/stable_diffusion/build.py --target cuda --model ~/sd-v1-5 --dtype float16
python examples/stable_diffusion/build.py --target cuda --size full   # SD1.5 architecture, random weights
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlcweb.cli import main as mlcweb_main
from mlcweb.model import DTYPES
from mlcweb.targets import TARGETS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="llvm", choices=list(TARGETS))
    parser.add_argument("--out", type=Path, help="artifact directory (default dist/<target>)")
    parser.add_argument("--model", type=Path, help="local diffusers SD1.5 folder (default: the tiny random model)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"], help="random-weight size without --model")
    parser.add_argument("--db", type=Path, help="MetaSchedule database to apply")
    parser.add_argument("--arch", help="cuda architecture (default sm_90)")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    cmd = ["build", "stable-diffusion", "--target", args.target, "--dtype", args.dtype, "--set", f"size={args.size}"]
    cmd += ["--out", str(args.out or Path("dist") / args.target)]
    if args.model:
        cmd += ["--model", str(args.model)]
    if args.db:
        cmd += ["--db", str(args.db)]
    if args.arch:
        cmd += ["--arch", args.arch]
    if args.no_cache:
        cmd.append("--no-cache")
    return mlcweb_main((["--verbose"] if args.verbose else []) + cmd)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Generate an image natively from artifacts built by build.py.

python examples/stable_diffusion/deploy.py --artifacts dist/llvm --prompt "a lighthouse at dusk" --output out.png
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mlcweb_stable_diffusion.runner import StableDiffusion
from mlcweb_stable_diffusion.schedulers import SCHEDULERS

from mlcweb.errors import MlcwebError
from mlcweb.runtime import load


def check_output(path: Path) -> None:
    """The PNG can be written: not a folder, and its folder exists (or can be made) and is writable."""
    if path.is_dir():
        raise MlcwebError(f"--output {path} is a folder; pass a file name such as {path / 'image.png'}")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MlcwebError(f"cannot create the folder of --output {path} ({err.strerror})") from err
    if not os.access(parent, os.W_OK):
        raise MlcwebError(f"cannot write --output {path}: its folder is not writable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("dist/llvm"))
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--output", type=Path, default=Path("output.png"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scheduler", default="dpm", choices=list(SCHEDULERS))
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu or cuda (default: the artifacts' target device)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_output(args.output)  # before minutes of work, not after
        sd = StableDiffusion(load(args.artifacts, args.device))
        result = sd.generate(
            args.prompt,
            args.negative_prompt,
            steps=args.steps,
            scheduler=args.scheduler,
            guidance=args.guidance,
            seed=args.seed,
            progress=True,
        )
        result.save_png(args.output)
    except MlcwebError as err:
        print(f"deploy: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deploy: interrupted; no image written", file=sys.stderr)
        return 130
    h, w = result.image.shape[:2]
    print(f"wrote {args.output} ({w}x{h}) on {sd.device}")
    for stage, secs in result.seconds.items():
        print(f"  {stage:<15} {secs * 1000:9.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

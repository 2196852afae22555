#!/usr/bin/env python3
"""Generate an image natively from artifacts built by build.py.

python examples/stable_diffusion/deploy.py --artifacts dist/llvm --prompt "a lighthouse at dusk" --output out.png
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mlcweb_stable_diffusion.runner import StableDiffusion
from mlcweb_stable_diffusion.schedulers import SCHEDULERS

from mlcweb.cli import check_output_file
from mlcweb.errors import MlcwebError
from mlcweb.runtime import load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("dist/llvm"))
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--output", type=Path, default=Path("output.png"))
    parser.add_argument(
        "--steps", type=int, help="denoising steps (default: the model's, 20 for SD1.5, 1 for SD-Turbo)"
    )
    parser.add_argument("--scheduler", choices=list(SCHEDULERS), help="default: the model's")
    parser.add_argument("--guidance", type=float, help="guidance scale; 1 or less: none (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu or cuda (default: the artifacts' target device)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_output_file(args.output, "image.png")  # before minutes of work, not after
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

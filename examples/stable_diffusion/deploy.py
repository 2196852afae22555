#!/usr/bin/env python3
"""Generate an image natively from artifacts built by build.py.

python examples/stable_diffusion/deploy.py --artifacts dist/llvm --prompt "a lighthouse at dusk" --output out.png
python examples/stable_diffusion/deploy.py --prompt "the same, in winter" --init-image out.png --strength 0.6
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from mlcweb_stable_diffusion.runner import StableDiffusion
from mlcweb_stable_diffusion.schedulers import SCHEDULERS

from mlcweb.cli import check_output_file
from mlcweb.errors import MlcwebError
from mlcweb.runtime import load


def read_init_image(path: Path, image_shape: list[int]) -> np.ndarray:
    """``path`` as RGB at the build's size (resized with Lanczos, as diffusers' image processor does)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise MlcwebError(f"--init-image {path} is not an image this machine can read ({err})") from err
    h, w = image_shape[:2]
    if rgb.size != (w, h):
        print(f"deploy: resizing --init-image from {rgb.size[0]}x{rgb.size[1]} to the build's {w}x{h}", file=sys.stderr)
        rgb = rgb.resize((w, h), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


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
    parser.add_argument("--init-image", type=Path, help="image-to-image: start from this picture (PNG, JPEG, ...)")
    parser.add_argument(
        "--strength", type=float, default=0.8, help="image-to-image: how much of the picture to redraw, (0, 1]"
    )
    parser.add_argument("--device", help="cpu or cuda (default: the artifacts' target device)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_output_file(args.output, "image.png")  # before minutes of work, not after
        sd = StableDiffusion(load(args.artifacts, args.device))
        init = None if args.init_image is None else read_init_image(args.init_image, sd.meta["image_shape"])
        result = sd.generate(
            args.prompt,
            args.negative_prompt,
            steps=args.steps,
            scheduler=args.scheduler,
            guidance=args.guidance,
            seed=args.seed,
            init_image=init,
            strength=args.strength,
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

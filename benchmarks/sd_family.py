#!/usr/bin/env python3
"""The rest of the Stable Diffusion family at full size (random weights, seeded): build a variant with
mlcweb and time an image at the variant's defaults, stage by stage, with peak device memory.

On the GPU machine, after ``source .dev/tvm-b/activate.sh && source benchmarks/gpu_env.sh``
(benchmarks/README.md)::

    python3 benchmarks/sd_family.py --variant sdxl --results $OUT        # 1024x1024, Euler 30 steps
    python3 benchmarks/sd_family.py --variant sd-turbo --results $OUT    # 512x512, one step
    python3 benchmarks/sd_family.py --variant sdxl-turbo --results $OUT

On a CPU (what the test suite runs): ``--target llvm --dtype float32 --size tiny``. PyTorch is not timed
here (``sd_gpu.py`` does that for SD1.5); the output is checked finite and not flat, and the record says
what was built: functions, kernels, planned memory per function, weights.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sd_bench import median_ms

log = logging.getLogger("sd_family")


def _build(args: argparse.Namespace) -> dict[str, Any]:
    import mlcweb_stable_diffusion.plugin as plugin

    from mlcweb import BuildOptions
    from mlcweb.build import build
    from mlcweb.plugins import PluginHost

    host = PluginHost([("stable_diffusion", plugin)], entry_points=False)
    options = BuildOptions(
        target=args.target,
        out=args.out,
        dtype=args.dtype,
        config={"size": args.size, "variant": args.variant},
        use_shipped_database=False,  # the shipped databases are tuned for SD1.5's kernels
    )
    start = time.perf_counter()
    result = build(host, "stable-diffusion", options, progress=True)
    return {"seconds": time.perf_counter() - start, "kernels": result.kernels, "stages": result.stage_seconds}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mlcweb_stable_diffusion.runner import StableDiffusion

    from mlcweb.runtime import load

    built = _build(args)
    sd = StableDiffusion(load(args.out))
    meta = sd.meta
    defaults = meta["defaults"]
    prompt = "a photograph of an astronaut riding a horse"
    memory = None
    if args.target == "cuda":
        from sd_bench import PeakMemory

        memory = PeakMemory()
    gen = sd.generate(prompt, seed=0)  # warm-up: first calls, CUDA graph capture
    times, seconds = [], {}
    with memory if memory is not None else _Null():
        for _ in range(args.repeat):
            start = time.perf_counter()
            gen = sd.generate(prompt, seed=0)
            times.append((time.perf_counter() - start) * 1000)
            seconds = gen.seconds
    unet, takes_scale = sd.unet_call(float(defaults["guidance"]))
    embeddings = sd.text(prompt) if unet == "unet_single" else sd.encode(prompt)
    latents = sd._tensor(np.random.default_rng(0).standard_normal(meta["latent_shape"]).astype(np.float32))
    t = sd._tensor(np.array(500, dtype=np.int32))
    scale = [sd._tensor(np.array(max(float(defaults["guidance"]), 1.0), dtype=np.float32))] if takes_scale else []
    unet_ms = median_ms(lambda: sd._call(unet, latents, t, *embeddings, *scale), sd.device.sync, args.repeat)
    vae_ms = median_ms(lambda: sd._call("vae", latents), sd.device.sync, args.repeat)
    image = gen.image[..., :3]
    if not np.isfinite(image).all() or np.unique(image).size < 16:
        raise SystemExit(f"sd_family: the {args.variant} image is flat or not finite: a broken build")
    manifest = json.loads((args.out / "manifest.json").read_text())
    return {
        "variant": meta["variant"],
        "date": datetime.date.today().isoformat(),
        "device": _device(args.target),
        "target": args.target,
        "dtype": args.dtype,
        "size": args.size,
        "image_shape": meta["image_shape"],
        "defaults": defaults,
        "build": built,
        "functions": sorted(manifest["functions"]),
        "planned_mib": {
            f: {"largest_block": m["largest_block_bytes"] / 2**20, "planned": m["planned_bytes"] / 2**20}
            for f, m in manifest.get("memory", {}).items()
        },
        "ms": {"image": statistics.median(times), f"{unet} step": unet_ms, "vae": vae_ms},
        "image_seconds": seconds,
        "peak_mib": memory.peak / 2**20 if memory is not None else None,
    }


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _device(target: str) -> str:
    if target == "cuda":
        import torch

        return str(torch.cuda.get_device_name(0))
    import platform

    return f"cpu ({platform.machine()})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="sdxl")
    p.add_argument("--target", default="cuda", choices=["cuda", "llvm"])
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path, help="artifact directory (default /tmp/sd-family-<variant>)")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    args.out = args.out or Path(f"/tmp/sd-family-{args.variant}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    record = run(args)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = f"{record['date']}-{record['device'].split()[0].lower()}-{args.variant}_{args.target}_{args.dtype}"
    path = args.results / f"{stem}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    print(json.dumps(record["ms"], indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

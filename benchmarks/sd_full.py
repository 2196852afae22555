#!/usr/bin/env python3
"""Full-size Stable Diffusion v1.5 (random weights, 512x512) built with mlcweb and run beside PyTorch.

Builds the SD1.5 architecture for ``--target`` (llvm or cuda), generates one image with the native
runtime and, in the same run, times PyTorch eager on the same weights and inputs. Writes JSON and a
Markdown table (ratios, not only absolute times). On the GPU machine (see benchmarks/README.md):

    python benchmarks/sd_full.py --target cuda --dtype float16 --results $OUT
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


class PeakMemory:
    """Samples device memory in use (NVML) every 5 ms; ``peak - baseline`` is what the run added."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.baseline = self.used()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def used(self) -> int:
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.005)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _median_ms(fn: Any, sync: Any, repeat: int = 10) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="cuda", choices=["llvm", "cuda"])
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sd-full"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default=None, help="results file stem (default sd_full_<target>_<dtype>)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import mlcweb_stable_diffusion.plugin as plugin
    from mlcweb_stable_diffusion.models import UNetStage, load_networks
    from mlcweb_stable_diffusion.runner import StableDiffusion

    from mlcweb import BuildOptions
    from mlcweb.build import build
    from mlcweb.plugins import PluginHost
    from mlcweb.runtime import load

    host = PluginHost([("stable_diffusion", plugin)], entry_points=False)
    options = BuildOptions(target=args.target, out=args.out, dtype=args.dtype, config={"size": "full"}, use_cache=False)
    start = time.perf_counter()
    result = build(host, "stable-diffusion", options, progress=False)
    build_seconds = time.perf_counter() - start
    print(result.summary(), flush=True)

    sd = StableDiffusion(load(args.out))
    prompt = "a photograph of an astronaut riding a horse"
    gpu = args.target == "cuda"
    memory = PeakMemory() if gpu else None
    with memory or _Null():
        gen = sd.generate(prompt, steps=args.steps, scheduler="dpm", seed=0)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"sd_full_{args.target}_{args.dtype}"
    gen.save_png(args.results / f"{stem}.png")

    record: dict[str, Any] = {
        "target": args.target,
        "dtype": args.dtype,
        "steps": args.steps,
        "build_seconds": build_seconds,
        "stage_seconds": result.stage_seconds,
        "kernels": result.kernels,
        "schedules": result.schedules.summary() if result.schedules else None,
        "mlcweb_ms": {k: v * 1000 for k, v in gen.seconds.items()},
        "peak_memory_mib": (memory.peak - memory.baseline) / 2**20 if memory else None,
        "image_std": float(gen.image[..., :3].std()),
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
    }

    if not args.no_torch:
        dev = "cuda" if gpu else "cpu"
        dtype = torch.float16 if args.dtype == "float16" else torch.float32
        nets = load_networks("full", None, 0)
        unet = UNetStage(nets.unet).to(dev, dtype).eval()
        rng = np.random.default_rng(0)
        lat = torch.from_numpy(rng.standard_normal(sd.meta["latent_shape"]).astype(np.float32))
        emb = torch.from_numpy(rng.standard_normal((2, 77, 768)).astype(np.float32))
        t, g = torch.tensor(801, dtype=torch.int32), torch.tensor(7.5)
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        with torch.no_grad():
            torch_ms = _median_ms(
                lambda: unet(lat.to(dev, dtype), t.to(dev), emb.to(dev, dtype), g.to(dev, dtype)), sync
            )
        ours = [sd._tensor(x) for x in (lat.numpy(), t.numpy(), emb.numpy(), g.numpy())]
        mlc_ms = _median_ms(lambda: sd._call("unet", *ours), sd.device.sync)
        with torch.no_grad():
            expected = unet(lat.to(dev, dtype), t.to(dev), emb.to(dev, dtype), g.to(dev, dtype)).float().cpu().numpy()
        got = sd._call("unet", *ours).numpy()
        record["unet_step_ms"] = {"mlcweb": mlc_ms, "torch_eager": torch_ms, "ratio": mlc_ms / torch_ms}
        record["unet_max_abs_err_vs_torch"] = float(np.abs(got - expected).max())
        record["unet_ref_abs_max"] = float(np.abs(expected).max())

    (args.results / f"{stem}.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    lines = [
        f"# Full-size SD1.5 ({args.target}, {args.dtype}) on {record['device']}",
        "",
        "| measure | mlcweb | PyTorch eager | ratio |",
        "|---|---|---|---|",
    ]
    if "unet_step_ms" in record:
        u = record["unet_step_ms"]
        lines.append(
            f"| UNet step (batch 2, ms, median of 10) | {u['mlcweb']:.1f} | {u['torch_eager']:.1f} | {u['ratio']:.2f} |"
        )
    for k, v in record["mlcweb_ms"].items():
        lines.append(f"| {k} (ms, one image) | {v:.1f} | | |")
    lines.append(f"| build (s) | {build_seconds:.0f} | | |")
    if record["peak_memory_mib"] is not None:
        lines.append(f"| peak GPU memory of generation (MiB) | {record['peak_memory_mib']:.0f} | | |")
    (args.results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    sys.exit(main())

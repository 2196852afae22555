#!/usr/bin/env python3
"""SD1.5's heaviest GEMMs and convolutions as single WebGPU kernels, per schedule variant, timed on the
GPU machine in node + Dawn (``webgpu/kernels.mjs``): the quick loop for WebGPU kernel work, where a whole
UNet build takes minutes.

::

    # here: one small webgpu library per variant and dtype
    python benchmarks/webgpu_kernels.py build --out .dev/webgpu-kernels [--variants scalar-nchw,vec4-nhwc]
    python benchmarks/sd_webgpu.py pack --builds .dev/webgpu --kernels .dev/webgpu-kernels --out .dev

    # on the GPU machine (carrying .dev/wgpu-a and .dev/wgpu-b; no TVM needed)
    python3 benchmarks/webgpu_kernels.py run --carry .dev --results $OUT

    # here
    python benchmarks/webgpu_kernels.py report RESULTS_DIR

Each variant's outputs are sampled and compared with the first variant's (same inputs, filled on the GPU
from a hash of their names), so a faster schedule that computes something else shows up in the table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name: (kind, input shape, weight shape); the shapes of SD1.5 at 512x512 (UNet batch 2, VAE batch 1)
SHAPES: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {
    "unet_conv_64": ("conv", (2, 320, 64, 64), (320, 320, 3, 3)),
    "unet_conv_32": ("conv", (2, 640, 32, 32), (640, 640, 3, 3)),
    "unet_conv_16": ("conv", (2, 1280, 16, 16), (1280, 1280, 3, 3)),
    "vae_conv_256": ("conv", (1, 256, 256, 256), (256, 256, 3, 3)),
    "vae_conv_512": ("conv", (1, 128, 512, 512), (128, 128, 3, 3)),
    "unet_ff_64": ("linear", (2, 4096, 320), (2560, 320)),
    "unet_scores_64": ("bmm", (8, 4096, 40), (8, 40, 4096)),
}
# the same kinds at a size SwiftShader runs in seconds (to check the runner and the numbers without a GPU)
TINY: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {
    "conv": ("conv", (2, 32, 16, 16), (64, 32, 3, 3)),
    "linear": ("linear", (2, 256, 64), (96, 64)),
    "bmm": ("bmm", (4, 128, 40), (4, 40, 128)),
}
# variant: (vector_k of the tiles, conv layout)
VARIANTS = {"scalar-nchw": (1, "NCHW"), "vec4-nchw": (4, "NCHW"), "vec4-nhwc": (4, "NHWC")}


def _flops(kind: str, x: tuple[int, ...], w: tuple[int, ...]) -> int:
    if kind == "conv":
        n, _, h, wd = x
        return 2 * n * h * wd * math.prod(w)
    if kind == "linear":
        return 2 * math.prod(x[:-1]) * w[0] * w[1]
    return 2 * x[0] * x[1] * x[2] * w[2]


def _module(dtype: str, shapes: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]) -> Any:
    from tvm import relax

    bb = relax.BlockBuilder()
    acc = "float32" if dtype == "float16" else None
    for name, (kind, xs, ws) in shapes.items():
        x = relax.Var("x", relax.TensorType(xs, dtype))
        w = relax.Var("w", relax.TensorType(ws, dtype))
        with bb.function(name, [x, w]):
            with bb.dataflow():
                if kind == "conv":
                    y = bb.emit(relax.op.nn.conv2d(x, w, padding=[1, 1, 1, 1], out_dtype=acc))
                elif kind == "linear":
                    y = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w), out_dtype=acc))
                else:
                    y = bb.emit(relax.op.matmul(x, w, out_dtype=acc))
                if acc:
                    y = bb.emit(relax.op.astype(y, dtype))
                out = bb.emit_output(y)
            bb.emit_func_output(out)
    return bb.get()


@contextlib.contextmanager
def _tiles(gemm: Any, vector_k: int) -> Iterator[None]:
    """This benchmark's knob: ``WebGPUMatmul``'s tiles with ``vector_k`` while building (the library picks
    its own tiles; nothing else sets them), restored afterwards even on an error."""
    saved = {name: getattr(gemm, name) for name in ("LARGE", "MEDIUM", "SMALL")}
    try:
        for name, tile in saved.items():
            setattr(gemm, name, dataclasses.replace(tile, vector_k=vector_k))
        yield
    finally:
        for name, tile in saved.items():
            setattr(gemm, name, tile)


def _build_library(dest: Path, variant: str, dtype: str, shapes: dict[str, Any], target: Any, options: Any) -> None:
    """One variant's library and its specs.json (what ``kernels.mjs`` calls, with the FLOPs of each)."""
    import tvm

    import mlcweb_passes as mp
    from mlcweb.wasm_runtime import link_wasm

    dest.mkdir(parents=True, exist_ok=True)
    exe = tvm.compile(_module(dtype, shapes), target, relax_pipeline=mp.pipeline(target, options))
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp) / "kernels.wasm"
        exe.export_library(str(lib), fcompile=link_wasm)
        (dest / "kernels.wasm").write_bytes(lib.read_bytes())
    functions = [
        {
            "name": name,
            "flops": _flops(kind, xs, ws),
            "inputs": [
                {"name": "x", "shape": list(xs), "dtype": dtype},
                {"name": "w", "shape": list(ws), "dtype": dtype},
            ],
        }
        for name, (kind, xs, ws) in shapes.items()
    ]
    specs = {"variant": variant, "dtype": dtype, "library": "kernels.wasm", "functions": functions}
    (dest / "specs.json").write_text(json.dumps(specs, indent=1))


def build(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    import tvm

    import mlcweb_passes as mp
    from mlcweb_passes.webgpu import gemm

    target = tvm.target.Target(
        {"kind": "webgpu", "max_shared_memory_per_block": 32768},
        host={"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"},
    )
    shapes = TINY if args.tiny else SHAPES
    for variant in args.variants.split(","):
        vector_k, layout = VARIANTS[variant]
        with _tiles(gemm, vector_k):
            for dtype in args.dtypes.split(","):
                dest = Path(args.out) / f"{variant}-{dtype}"
                _build_library(dest, variant, dtype, shapes, target, mp.PipelineOptions(conv_layout=layout))
                print(f"built {dest}", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(HERE))
    from sd_webgpu import F16_TOGGLE, UNROUNDED, _node_env, _unpack

    root = _unpack(Path(args.carry))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    failed = 0
    for build_dir in sorted((root / "kernels").iterdir()):
        cmd = [
            str(root / "node"),
            str(root / "kernels.mjs"),
            "--build",
            str(build_dir),
            "--tvmjs",
            str(root / "tvmjs.js"),
        ]
        cmd += ["--dawn", str(root / "webgpu"), "--repeat", str(args.repeat), "--toggle", F16_TOGGLE]
        cmd += ["--toggle", UNROUNDED, "--out", str(results / f"kernels-{build_dir.name}.json")]
        failed += subprocess.run(cmd, env=_node_env(), check=False, timeout=args.timeout).returncode != 0
    return 1 if failed else 0


def _rel_rms(a: list[float], b: list[float]) -> float:
    num = sum((x - y) ** 2 for x, y in zip(a, b, strict=True))
    den = sum(y * y for y in b) or 1.0
    return math.sqrt(num / den)


def report(args: argparse.Namespace) -> int:
    runs = [json.loads(p.read_text()) for p in sorted(Path(args.dir).glob("kernels-*.json"))]
    if not runs:
        print(f"no kernels-*.json in {args.dir}", file=sys.stderr)
        return 2
    reference = {r["dtype"]: r for r in runs if r["variant"] == runs[0]["variant"]}
    f32 = reference.get("float32")
    names = list(runs[0]["kernels"])
    print("| variant | dtype | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for r in runs:
        cells = []
        for name in names:
            k = r["kernels"][name]
            ref = (f32 or reference[r["dtype"]])["kernels"][name]
            err = _rel_rms(k["sample"], ref["sample"])
            ok = "" if k["finite"] and err < (2e-2 if r["dtype"] == "float16" else 1e-4) else f" (rel. RMS {err:.1g}!)"
            cells.append(f"{k['gemm_ms']:.2f} ms, {k['tflops']:.1f} TF{ok}")
        print(f"| {r['variant']} | {r['dtype']} | " + " | ".join(cells) + " |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--variants", default=",".join(VARIANTS))
    b.add_argument("--dtypes", default="float32,float16")
    b.add_argument("--tiny", action="store_true", help="small shapes, for SwiftShader")
    r = sub.add_parser("run")
    r.add_argument("--carry", required=True)
    r.add_argument("--results", required=True)
    r.add_argument("--repeat", type=int, default=20)
    r.add_argument("--timeout", type=int, default=300)
    rep = sub.add_parser("report")
    rep.add_argument("dir")
    args = parser.parse_args(argv)
    return {"build": build, "run": run, "report": report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

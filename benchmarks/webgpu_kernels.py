#!/usr/bin/env python3
"""SD1.5's heaviest GEMMs, convolutions and attentions as single WebGPU functions, per schedule variant,
timed on the GPU machine in node + Dawn (``webgpu/kernels.mjs``): the quick loop for WebGPU kernel work,
where a whole UNet build takes minutes. A GEMM's time is its GEMM kernels' GPU time; an attention's is
every kernel of the function (the flash kernel, or the unfused variant's score GEMMs, softmax and
transposes).

::

    # here: one small webgpu library per variant and dtype
    python benchmarks/webgpu_kernels.py build --out .dev/webgpu-kernels [--variants scalar-nchw,vec4-nhwc]
    python benchmarks/sd_webgpu.py pack --builds .dev/webgpu --kernels .dev/webgpu-kernels --out .dev

    # on the GPU machine (carrying .dev/wgpu-a and .dev/wgpu-b; no TVM needed)
    python3 benchmarks/webgpu_kernels.py run --carry .dev --results $OUT

    # on the GPU machine: the written attention kernels (kernel builds' and model builds' tables) on random
    # inputs against a float64 reference
    python3 benchmarks/webgpu_kernels.py check --carry .dev --results $OUT

    # here
    python benchmarks/webgpu_kernels.py report RESULTS_DIR

Each variant's outputs are sampled and compared with the first variant's (same inputs, filled on the GPU
from a hash of their names), so a faster schedule that computes something else shows up in the table;
attention inputs are filled at unit scale (at the weights' 1/sqrt(fan-in) their outputs sat below float16's
normal range and every variant compared equal, right or wrong). ``check`` is the known-answer test.
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
from unittest import mock

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
    # attention: (q [B, N, H, D], k and v [B, N_kv, H, D]) as torch.export leaves SDPA
    "unet_attn_64": ("attention", (2, 4096, 8, 40), (2, 4096, 8, 40)),
    "unet_attn_32": ("attention", (2, 1024, 8, 80), (2, 1024, 8, 80)),
    "unet_xattn_64": ("attention", (2, 4096, 8, 40), (2, 77, 8, 40)),
    "sd21_attn_64": ("attention", (2, 4096, 5, 64), (2, 4096, 5, 64)),  # SD2.1's heads of 64 at 512x512
    "unet_xattn_32": ("attention", (2, 1024, 8, 80), (2, 77, 8, 80)),
    "unet_attn_16": ("attention", (2, 256, 8, 160), (2, 256, 8, 160)),
    "unet_xattn_16": ("attention", (2, 256, 8, 160), (2, 77, 8, 160)),
}
# the same kinds at a size SwiftShader runs in seconds (to check the runner and the numbers without a GPU)
TINY: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {
    "conv": ("conv", (2, 32, 16, 16), (64, 32, 3, 3)),
    "linear": ("linear", (2, 256, 64), (96, 64)),
    "bmm": ("bmm", (4, 128, 40), (4, 40, 128)),
    "attention": ("attention", (1, 96, 2, 40), (1, 77, 2, 40)),
}
# variant: (WebGPUTile fields changed from the library's tiles, conv layout, flash attention,
# WidenGemmOperands)
VARIANTS: dict[str, tuple[dict[str, Any], str, bool, bool]] = {
    "scalar-nchw": ({"vector_k": 1}, "NCHW", True, False),
    "vec4-nchw": ({}, "NCHW", True, False),
    "vec4-nhwc": ({}, "NHWC", True, False),
    "vec4-nhwc-unfused": ({}, "NHWC", False, False),
    "vec4-nhwc-wide": ({}, "NHWC", True, True),
    "vec4-nhwc-prefetch": ({"prefetch": True}, "NHWC", True, False),
    "vec4-nhwc-prefetch-k32": ({"prefetch": True, "step_k": 32}, "NHWC", True, False),
    # the library's tiles before 2026-12-06: a thread's outputs in adjacent pairs (2-way bank conflicts)
    "vec4-nhwc-pairs": ({"virtual_i": "half_micro_i", "virtual_j": "half_micro_j"}, "NHWC", True, False),
    # the library before 2026-12-06's vector loads: every storage buffer array<T>, each vec4 four loads
    "vec4-nhwc-scalarload": ({}, "NHWC", True, False),
    # 32-deep reduction steps (float16 tiles 18 KiB of workgroup memory at 128x128)
    "vec4-nhwc-k32": ({"step_k": 32}, "NHWC", True, False),
    # the large tile 128x64 (8x4 a thread): more workgroups where N is 320 or 640
    "vec4-nhwc-128x64": ({"micro_j": 4, "virtual_j": 4}, "NHWC", True, False),
}
SCALAR_LOADS = {"vec4-nhwc-scalarload"}  # variants built with PipelineOptions(vector_loads=False)
# float16 variants with kernels on subgroup matrices (vec4-nhwc's library plus its matrix.json, which
# kernels.mjs installs as the page does): the GEMMs (`matrix`, attention on TVM's kernel), and the flash
# attentions too with these layouts ((subgroups, keys a step), tried in order; () the library's
# webgpu/matrix_attention.LAYOUTS); `-no-pf`: K/V not read a step ahead (matrix_attention.PREFETCH off);
# `-48k`: planned within 48 KiB of workgroup memory instead of 32; `-union`: Q's tile sharing one array
# with the K, V and probability tiles (matrix_attention.UNION on); `-single`: one K/V tile, five barriers
# a step (matrix_attention.DOUBLE_BUFFER off)
MATRIX_VARIANTS: dict[str, tuple[tuple[int, int], ...] | None] = {
    "matrix": None,
    "matrix-attn": (),
    "matrix-attn-no-pf": (),
    "matrix-attn-4x32": ((4, 32), (2, 32), (2, 16)),
    "matrix-attn-4x32-48k": ((4, 32), (2, 32), (2, 16)),
    "matrix-attn-4x64-48k": ((4, 64), (4, 32), (2, 32), (2, 16)),
    "matrix-attn-8x16": ((8, 16), (4, 16), (2, 16)),
    "matrix-attn-2x16": ((2, 16),),
    "matrix-attn-union": (),
    "matrix-attn-single": (),
}
# float16 variants with the GEMMs on subgroup matrices and the flash attentions in WGSL on the lanes
# (webgpu/lane_attention), with these layouts ((rows, keys a step), tried in order) ahead of its LAYOUTS,
# and K/V tiles read a step ahead into registers or not (lane_attention.PREFETCH)
LANE_VARIANTS: dict[str, tuple[tuple[tuple[int, int], ...], bool]] = {
    "lanes": ((), False),
    "lanes-prefetch": ((), True),
    "lanes-32x32": (((32, 32),), False),
    "lanes-64x16": (((64, 16),), False),
}
# vec4-nhwc with other portable flash-attention tiles tried first ((rows, keys, rows a thread), ahead of
# webgpu/flash_attention.TILES): larger tiles within the same 32 KiB of workgroup memory
FLASH_VARIANTS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "flash-128x32": ((128, 32, 4),),
    "flash-64x64": ((64, 64, 4),),
    "flash-64x32x8": ((64, 32, 8),),
    "flash-128x32x8": ((128, 32, 8),),
}


def _options(variant: str) -> Any:
    """The variant's pipeline options (its layout, flash attention, operand widening and loads)."""
    import mlcweb_passes as mp
    from mlcweb_passes.webgpu.flash_attention import WebGPUFlashTile

    _, layout, flash, wide = VARIANTS.get(variant, VARIANTS["vec4-nhwc"])
    return mp.PipelineOptions(
        conv_layout=layout,
        flash_attention=flash,
        widen_gemm_operands=wide,
        vector_loads=variant not in SCALAR_LOADS,
        webgpu_flash_tiles=tuple(WebGPUFlashTile(*t) for t in FLASH_VARIANTS.get(variant, ())),
    )


def _flops(kind: str, x: tuple[int, ...], w: tuple[int, ...]) -> int:
    if kind == "conv":
        n, _, h, wd = x
        return 2 * n * h * wd * math.prod(w)
    if kind == "linear":
        return 2 * math.prod(x[:-1]) * w[0] * w[1]
    if kind == "attention":  # Q @ K^T and P @ V
        return 4 * x[0] * x[2] * x[1] * w[1] * x[3]
    return 2 * x[0] * x[1] * x[2] * w[2]


def _inputs(kind: str, xs: tuple[int, ...], ws: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    return [("q", xs), ("k", ws), ("v", ws)] if kind == "attention" else [("x", xs), ("w", ws)]


def _attention(bb: Any, q: Any, k: Any, v: Any, dtype: str) -> Any:
    """SDPA as torch.export and mixed precision leave it: head transposes, float32 scores and softmax."""
    from tvm import relax

    op = relax.op
    d = int(q.ty.shape[3])
    qh, kh, vh = op.permute_dims(q, [0, 2, 1, 3]), op.permute_dims(k, [0, 2, 3, 1]), op.permute_dims(v, [0, 2, 1, 3])
    scores = bb.emit(op.matmul(qh, kh, out_dtype="float32"))
    probs = bb.emit(op.nn.softmax(op.multiply(scores, relax.const(d**-0.5, "float32")), axis=-1))
    out = bb.emit(op.matmul(op.astype(probs, dtype), vh, out_dtype="float32"))
    return bb.emit(op.permute_dims(op.astype(out, dtype), [0, 2, 1, 3]))


def _io(dtype: str) -> tuple[str, str]:
    """(input dtype, output dtype) of a ``--dtypes`` entry: ``float16``, or ``float16-to-float32`` for a
    GEMM that reads one and writes the other (to tell the cost of float16 reads from float16 writes)."""
    inp, _, out = dtype.partition("-to-")
    return inp, out or inp


def _module(dtype: str, shapes: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]) -> Any:
    from tvm import relax

    bb = relax.BlockBuilder()
    inp, out_dtype = _io(dtype)
    acc = "float32" if "float16" in (inp, out_dtype) else None
    for name, (kind, xs, ws) in shapes.items():
        args = [relax.Var(arg, relax.TensorType(shape, inp)) for arg, shape in _inputs(kind, xs, ws)]
        x, w = args[:2]
        with bb.function(name, args):
            with bb.dataflow():
                if kind == "attention":
                    y = _attention(bb, *args, inp)
                elif kind == "conv":
                    y = bb.emit(relax.op.nn.conv2d(x, w, padding=[1, 1, 1, 1], out_dtype=acc))
                elif kind == "linear":
                    y = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w), out_dtype=acc))
                else:
                    y = bb.emit(relax.op.matmul(x, w, out_dtype=acc))
                if acc and kind != "attention" and out_dtype != "float32":
                    y = bb.emit(relax.op.astype(y, out_dtype))
                out = bb.emit_output(y)
            bb.emit_func_output(out)
    return bb.get()


def tile_change(item: str, fields: Any) -> tuple[str, Any]:
    """One ``FIELD=VALUE`` of a command line as a :func:`_tiles` change: an integer converted to the
    field's type (``prefetch=1``), or the name of a field of ``fields`` (a tile), maybe ``half_``."""
    field, _, value = item.partition("=")
    if hasattr(fields, value.removeprefix("half_")):
        return field, value
    return field, type(getattr(fields, field))(int(value))


def _tile_value(tile: Any, value: Any) -> Any:
    """``value``, or the field of ``tile`` it names (``micro_i``; ``half_micro_i``: half of it)."""
    if not isinstance(value, str):
        return value
    name = value.removeprefix("half_")
    return getattr(tile, name) // 2 if name != value else getattr(tile, name)


@contextlib.contextmanager
def _tiles(gemm: Any, changes: dict[str, Any]) -> Iterator[None]:
    """This benchmark's knob: ``WebGPUMatmul``'s tiles with ``changes`` (``vector_k``, ``prefetch``,
    ``step_k``; a value that names a field takes that field of each tile: ``virtual_i="micro_i"``, and
    ``half_<field>`` half of it) while building (the library picks its own tiles; nothing else sets
    them), restored afterwards even on an error."""
    saved = {name: getattr(gemm, name) for name in ("LARGE", "MEDIUM", "SMALL")}
    try:
        for name, tile in saved.items():
            values = {k: _tile_value(tile, v) for k, v in changes.items()}
            setattr(gemm, name, dataclasses.replace(tile, **values))
        yield
    finally:
        for name, tile in saved.items():
            setattr(gemm, name, tile)


def _build_library(dest: Path, variant: str, dtype: str, shapes: dict[str, Any], target: Any, options: Any) -> None:
    """One variant's library and its specs.json (what ``kernels.mjs`` calls, with the FLOPs of each)."""
    functions = [
        {
            "name": name,
            "flops": _flops(kind, xs, ws),
            "time": "all" if kind == "attention" else "gemm",
            "inputs": [
                {"name": arg, "shape": list(shape), "dtype": _io(dtype)[0]} for arg, shape in _inputs(kind, xs, ws)
            ],
        }
        for name, (kind, xs, ws) in shapes.items()
    ]
    module = _module(dtype, shapes)
    if variant not in MATRIX_VARIANTS and variant not in LANE_VARIANTS:
        _write_library(dest, _compile(module, target, options), variant, dtype, functions)
        return
    if variant in LANE_VARIANTS:
        exe, table = _compile_matrix(module, target, options, None, lanes=LANE_VARIANTS[variant])
    else:
        exe, table = _compile_matrix(module, target, options, MATRIX_VARIANTS[variant], variant)
    _write_library(dest, exe, variant, dtype, functions)
    (dest / "matrix.json").write_text(json.dumps(table, indent=1))
    specs = json.loads((dest / "specs.json").read_text())
    (dest / "specs.json").write_text(json.dumps({**specs, "matrix": "matrix.json"}, indent=1))


def _compile_matrix(
    module: Any,
    target: Any,
    options: Any,
    layouts: tuple[tuple[int, int], ...] | None,
    variant: str = "",
    lanes: tuple[tuple[tuple[int, int], ...], bool] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """``module`` compiled with its GEMMs (and, given ``layouts``, its attentions) planned on subgroup
    matrices, or (given ``lanes``: layouts tried first) its attentions on the lanes, and the table of
    those kernels ({shader: {code, grid}}) as builds write it."""
    import tvm

    import mlcweb_passes as mp
    from mlcweb.wgsl_check import wgsl_sources
    from mlcweb_passes.webgpu import lane_attention, matrix_attention, matrix_gemm

    config = matrix_gemm.MatrixConfig()
    options = dataclasses.replace(
        options,
        dtype="float16",
        webgpu_matrix=config,
        webgpu_attention="lanes" if lanes is not None else "matrix" if layouts is not None else "portable",
        webgpu_matrix_shared=49152 if variant.endswith("-48k") else None,
    )
    attention_flags: dict[str, Any] = {
        "PREFETCH": matrix_attention.PREFETCH and not variant.endswith("-no-pf"),
        "UNION": matrix_attention.UNION or variant.endswith("-union"),
        "DOUBLE_BUFFER": matrix_attention.DOUBLE_BUFFER and not variant.endswith("-single"),
        "LAYOUTS": layouts or matrix_attention.LAYOUTS,
        "NARROW_LAYOUTS": () if layouts else matrix_attention.NARROW_LAYOUTS,  # a variant's layouts alone
    }
    lane_flags: dict[str, Any] = {
        "LAYOUTS": (*(lanes[0] if lanes else ()), *lane_attention.LAYOUTS),
        "PREFETCH": lanes[1] if lanes else lane_attention.PREFETCH,
    }
    with (
        mock.patch.multiple(matrix_attention, **attention_flags),
        mock.patch.multiple(lane_attention, **lane_flags),
        target,
    ):
        lowered = mp.pipeline(target, options)(module)
    exe = tvm.compile(lowered, target, relax_pipeline=None, tir_pipeline=mp.tir_pipeline(target, options))
    gemms, attention = matrix_attention.planned_kernels(lowered, wgsl_sources(exe.mod), config)
    kernels = {**gemms, **attention}
    return exe, {k.name: {"code": k.code, "grid": list(k.grid)} for k in kernels.values()}


def _write_library(dest: Path, exe: Any, variant: str, dtype: str, functions: list[dict[str, Any]]) -> None:
    """``exe`` linked as ``dest/kernels.wasm`` beside the specs.json ``kernels.mjs`` reads."""
    from mlcweb.wasm_runtime import link_wasm

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp) / "kernels.wasm"
        exe.export_library(str(lib), fcompile=link_wasm)
        (dest / "kernels.wasm").write_bytes(lib.read_bytes())
    specs = {"variant": variant, "dtype": dtype, "library": "kernels.wasm", "functions": functions}
    (dest / "specs.json").write_text(json.dumps(specs, indent=1))


def _compile(module: Any, target: Any, options: Any, after: str | None = None) -> Any:
    """``module`` through the library's Relax and TIR pipelines for ``options``, as builds compile
    (``after``: only the phases after that one, for kernels already fused)."""
    import tvm

    import mlcweb_passes as mp

    relax_pipeline = mp.pipeline(target, options, after=after)
    return tvm.compile(module, target, relax_pipeline=relax_pipeline, tir_pipeline=mp.tir_pipeline(target, options))


def _target() -> Any:
    import tvm

    return tvm.target.Target(
        {"kind": "webgpu", "max_shared_memory_per_block": 32768},
        host={"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"},
    )


def dump(args: argparse.Namespace) -> int:
    """The float16 WGSL of each variant's kernel for a linear shape, as ``f16_math.mjs --tvm`` reads it:
    ``<out>/<M>x<N>x<K>-<variant>.wgsl``."""
    sys.path.insert(0, str(ROOT))
    from mlcweb.wgsl_check import wgsl_sources
    from mlcweb_passes.webgpu import gemm

    kind, xs, ws = SHAPES[args.shape]
    if kind != "linear":
        print(f"webgpu_kernels dump: {args.shape} is a {kind}; f16_math.mjs binds linear GEMMs only", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = _target()
    for variant in args.variants.split(","):
        with _tiles(gemm, VARIANTS[variant][0]):
            exe = _compile(_module("float16", {args.shape: SHAPES[args.shape]}), target, _options(variant))
        (source,) = wgsl_sources(exe.mod).values()
        dest = out / f"{math.prod(xs[:-1])}x{ws[0]}x{ws[1]}-{variant}.wgsl"
        dest.write_text(source.lstrip("\n"))
        print(f"wrote {dest}")
    return 0


def build(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    from mlcweb_passes.webgpu import gemm

    target = _target()
    shapes = TINY if args.tiny else SHAPES
    if args.only:
        shapes = {name: shape for name, shape in shapes.items() if name in args.only.split(",")}
    for variant in args.variants.split(","):
        if not any(variant in table for table in (VARIANTS, MATRIX_VARIANTS, FLASH_VARIANTS, LANE_VARIANTS)):
            print(f"webgpu_kernels build: no variant {variant!r}", file=sys.stderr)
            return 2
        options = _options(variant)
        with _tiles(gemm, VARIANTS.get(variant, ({},))[0]):
            for dtype in args.dtypes.split(","):
                if (variant in MATRIX_VARIANTS or variant in LANE_VARIANTS) and dtype != "float16":
                    continue  # subgroup matrices: float16 only
                dest = Path(args.out) / f"{variant}-{dtype}"
                _build_library(dest, variant, dtype, shapes, target, options)
                print(f"built {dest}", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(HERE))
    from sd_webgpu import F16_TOGGLE, UNROUNDED, UNSAFE, _node_env, _unpack

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
        cmd += ["--dawn", str(root / "webgpu"), "--repeat", str(args.repeat), "--warm-ms", str(args.warm_ms)]
        cmd += ["--toggle", F16_TOGGLE]
        cmd += ["--toggle", UNROUNDED, "--out", str(results / f"kernels-{build_dir.name}.json")]
        cmd += ["--toggle", UNSAFE] if "matrix" in json.loads((build_dir / "specs.json").read_text()) else []
        failed += subprocess.run(cmd, env=_node_env(), check=False, timeout=args.timeout).returncode != 0
    return 1 if failed else 0


def matrix_tables(root: Path, only: set[str] | None = None) -> list[Path]:
    """The subgroup-matrix tables an unpacked carry holds: each kernel build's ``matrix.json`` and each
    model build's ``*-matrix.json`` and ``*-matrix-<bytes>.json`` (the tables for adapters granting more
    workgroup memory); with ``only``, those of the builds so named (their folder names)."""
    builds = [*root.glob("builds/*/*-matrix.json"), *root.glob("builds/*/*-matrix-[0-9]*.json")]
    tables = sorted(root.glob("kernels/*/matrix.json")) + sorted(builds)
    return [t for t in tables if only is None or t.parent.name in only]


def check(args: argparse.Namespace) -> int:
    """Known answers on the GPU machine: every written flash-attention kernel of the carried kernel builds'
    and model builds' subgroup-matrix tables, alone on random inputs, against a float64 reference
    (``webgpu/attention_check.mjs``), into ``attention-check.json``; exit 1 where one is off by more than
    float16 rounding (relative RMS 1e-2)."""
    sys.path.insert(0, str(HERE))
    from sd_webgpu import F16_TOGGLE, UNSAFE, _node_env, _unpack

    root = _unpack(Path(args.carry))
    only = set(args.only.split(",")) if args.only else None
    tables = matrix_tables(root, only)
    if not tables:
        which = f" of {', '.join(sorted(only))}" if only else ""
        print(f"webgpu_kernels check: no subgroup-matrix tables{which} under {root}", file=sys.stderr)
        return 2
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    out = results / "attention-check.json"
    cmd = [str(root / "node"), str(root / "attention_check.mjs"), "--dawn", str(root / "webgpu")]
    cmd += ["--toggle", F16_TOGGLE, "--toggle", UNSAFE, "--tables", ",".join(map(str, tables)), "--out", str(out)]
    if subprocess.run(cmd, env=_node_env(), check=False, timeout=args.timeout).returncode != 0:
        return 1
    bad = {name: r for name, r in json.loads(out.read_text()).items() if r["rel_rms"] > 1e-2}
    for name, r in bad.items():
        print(f"webgpu_kernels check: {name} is off: relative RMS {r['rel_rms']:.2g}", file=sys.stderr)
    return 1 if bad else 0


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
            ok = "" if k["finite"] and err < (2e-2 if "float16" in r["dtype"] else 1e-4) else f" (rel. RMS {err:.1g}!)"
            cells.append(f"{k['gemm_ms']:.2f} ms, {k['tflops']:.1f} TF{ok}")
        print(f"| {r['variant']} | {r['dtype']} | " + " | ".join(cells) + " |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    every = [*VARIANTS, *MATRIX_VARIANTS, *FLASH_VARIANTS, *LANE_VARIANTS]
    b.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(every)}")
    b.add_argument(
        "--dtypes", default="float32,float16", help="float32, float16, or IN-to-OUT (GEMMs reading IN, writing OUT)"
    )
    b.add_argument("--tiny", action="store_true", help="small shapes, for SwiftShader")
    b.add_argument("--only", help="build only these shapes (comma-separated names, e.g. unet_attn_64)")
    r = sub.add_parser("run")
    r.add_argument("--carry", required=True)
    r.add_argument("--results", required=True)
    r.add_argument("--repeat", type=int, default=20)
    r.add_argument("--timeout", type=int, default=300)
    r.add_argument("--warm-ms", type=int, default=500, help="GPU kept busy before each function's timing")
    c = sub.add_parser("check", help="the written attention kernels against a float64 reference, on the GPU")
    c.add_argument("--carry", required=True)
    c.add_argument("--results", required=True)
    c.add_argument("--timeout", type=int, default=300)
    c.add_argument("--only", help="check only these builds (folder names, e.g. sd15c-float16,matrix-attn-float16)")
    rep = sub.add_parser("report")
    rep.add_argument("dir")
    d = sub.add_parser("dump", help="float16 WGSL of a linear GEMM's kernel per variant, for webgpu/f16_math.mjs")
    d.add_argument("--out", required=True)
    d.add_argument("--shape", default="unet_ff_64")
    d.add_argument("--variants", default="vec4-nhwc,vec4-nhwc-pairs,vec4-nhwc-scalarload")
    args = parser.parse_args(argv)
    return {"build": build, "run": run, "check": check, "report": report, "dump": dump}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

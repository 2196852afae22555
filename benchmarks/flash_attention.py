#!/usr/bin/env python3
"""mlcweb's flash-attention kernel against the unfused TVM path and PyTorch, shape by shape, on CUDA.

For each attention shape of full-size SD1.5's UNet (batch 2 for guidance, 8 heads; self-attention at
64x64, 32x32, 16x16 and 8x8 latents and cross-attention to 77 text tokens), on the same random float16
inputs ``[batch, seq, heads, head_dim]``:

- ``flash``: the Relax graph torch.export and mixed precision give (head transposes, ``Q @ K^T`` in
  float32, softmax, ``P @ V``) compiled with ``mlcweb_passes.pipeline``, where ``FlashAttention`` makes
  it one :func:`mlcweb_passes.cuda.flash_kernel.flash_attention_kernel` call (checked);
- ``unfused``: the same graph compiled with ``flash_attention=False``: what a build did before;
- ``torch_sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch picks its flash or
  memory-efficient kernel);
- ``torch_math``: PyTorch's unfused math path (``softmax(q @ k^T) @ v``).

Outputs are checked against a float32 PyTorch reference computed from the same float16 inputs (max abs
error; ``--atol``). Writes ``flash_attention.json`` and ``flash_attention.md`` into ``--results``.
Medians of ``--repeat`` timed calls after warm-up, each timed with CUDA events around ``--number``
calls.

    python3 benchmarks/flash_attention.py --results $OUT
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import kernel_bench  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402

import mlcweb_passes as mp  # noqa: E402
from mlcweb_passes.cuda.flash_kernel import AttentionShape, flash_attention_kernel  # noqa: E402

# (name, batch, q_len, kv_len, heads, head_dim): SD1.5's UNet at 512x512
SHAPES = [
    ("self 64x64", 2, 4096, 4096, 8, 40),
    ("cross 64x64", 2, 4096, 77, 8, 40),
    ("self 32x32", 2, 1024, 1024, 8, 80),
    ("cross 32x32", 2, 1024, 77, 8, 80),
    ("self 16x16", 2, 256, 256, 8, 160),
    ("cross 16x16", 2, 256, 77, 8, 160),
    ("self 8x8", 2, 64, 64, 8, 160),
    ("odd: 100 queries, 33 keys, d=20", 1, 100, 33, 3, 20),
]


def unfused_module(shape: AttentionShape, scale: float) -> tvm.IRModule:
    """The attention as torch.export + MixedPrecision leave it: head transposes, float32 scores."""
    b, nq, nk, h, d = shape.batch, shape.q_len, shape.kv_len, shape.heads, shape.head_dim
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((b, nq, h, d), "float16"))
    k = relax.Var("k", relax.TensorType((b, nk, h, d), "float16"))
    v = relax.Var("v", relax.TensorType((b, nk, h, d), "float16"))
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            qt = bb.emit(relax.op.permute_dims(q, [0, 2, 1, 3]))
            kt = bb.emit(relax.op.permute_dims(k, [0, 2, 3, 1]))
            vt = bb.emit(relax.op.permute_dims(v, [0, 2, 1, 3]))
            s = bb.emit(relax.op.matmul(qt, kt, out_dtype="float32"))
            s = bb.emit(relax.op.multiply(s, relax.const(scale, "float32")))
            p = bb.emit(relax.op.astype(relax.op.nn.softmax(s, axis=-1), "float16"))
            o = bb.emit(relax.op.astype(relax.op.matmul(p, vt, out_dtype="float32"), "float16"))
            out = bb.emit_output(relax.op.permute_dims(o, [0, 2, 1, 3]))
        bb.emit_func_output(out)
    return bb.get()


def run_shape(name: str, shape: AttentionShape, target: tvm.target.Target, args: argparse.Namespace) -> dict[str, Any]:
    scale = 1 / math.sqrt(shape.head_dim)
    gen = torch.Generator().manual_seed(0)
    dims = (shape.batch, shape.q_len, shape.heads, shape.head_dim)
    kv_dims = (shape.batch, shape.kv_len, shape.heads, shape.head_dim)
    q, k, v = (torch.randn(s, generator=gen).half().cuda() for s in (dims, kv_dims, kv_dims))
    qt, kt, vt = (x.permute(0, 2, 1, 3) for x in (q, k, v))
    ref = torch.softmax((qt.float() @ kt.float().transpose(-1, -2)) * scale, -1) @ vt.float()
    ref_np = ref.permute(0, 2, 1, 3).cpu().numpy()
    dev = tvm.cuda()
    q_t, k_t, v_t = (tvm.runtime.from_dlpack(x) for x in (q, k, v))
    row: dict[str, Any] = {"name": name, "shape": list(dims), "kv_len": shape.kv_len, "ms": {}, "max_abs_err": {}}

    mod = unfused_module(shape, scale)
    if not any(gv.name_hint.startswith("flash_attention") for gv in mp.FlashAttention()(mod).functions):
        raise RuntimeError("FlashAttention did not match the attention graph")
    for key, flash in (("flash", True), ("unfused", False)):
        t0 = time.time()
        with tvm.transform.PassContext(config=mp.async_copy_config(target)):
            exe = tvm.compile(mod, target, relax_pipeline=mp.pipeline(target, flash_attention=flash))
        row[f"{key}_compile_s"] = round(time.time() - t0, 1)
        vm = relax.VirtualMachine(exe, dev)
        got = vm["main"](q_t, k_t, v_t)
        row["max_abs_err"][key] = float(np.abs(got.numpy().astype(np.float32) - ref_np).max())
        row["ms"][key] = kernel_bench.time_ms(lambda vm=vm: vm["main"](q_t, k_t, v_t), args.number, args.repeat)

    for variant in filter(None, (args.variants or "").split(";")):
        warps, block_n, *m_tiles = map(int, variant.split(","))
        kernel = functools.partial(
            flash_attention_kernel, warps=warps, block_n=block_n, m_tiles=m_tiles[0] if m_tiles else 1
        )
        try:
            exe = tvm.compile(mp.FlashAttention(kernel)(mod), target, relax_pipeline=mp.pipeline(target))
        except ValueError as err:  # a tile the head dimension does not divide
            row["max_abs_err"][f"flash:{variant}"] = str(err)
            continue
        vm = relax.VirtualMachine(exe, dev)
        got = vm["main"](q_t, k_t, v_t)
        row["max_abs_err"][f"flash:{variant}"] = float(np.abs(got.numpy().astype(np.float32) - ref_np).max())
        row["ms"][f"flash:{variant}"] = kernel_bench.time_ms(
            lambda vm=vm: vm["main"](q_t, k_t, v_t), args.number, args.repeat
        )

    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)  # noqa: E731
    math_path = lambda: torch.softmax((qt @ kt.transpose(-1, -2)) * scale, -1) @ vt  # noqa: E731
    for key, fn in (("torch_sdpa", sdpa), ("torch_math", math_path)):
        row["max_abs_err"][key] = float((fn().float() - ref).abs().max())
        row["ms"][key] = kernel_bench.time_ms(fn, args.number, args.repeat)
    row["ok"] = row["max_abs_err"]["flash"] <= args.atol
    return row


def markdown(record: dict[str, Any]) -> str:
    lines = [
        f"# Flash attention on {record['device']}",
        "",
        "float16 `[batch, seq, heads, head_dim]`; ms per call (median); error: max abs against float32 PyTorch.",
        "",
        "| shape | B,N,H,D | keys | flash | unfused TVM | torch SDPA | torch math | unfused/flash | SDPA/flash "
        "| flash err | SDPA err | variants (warps,block_n,m_tiles: ms, err) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['shape']} | {r['kv_len']} | error: {r['error'][:80]} |")
            continue
        ms, err = r["ms"], r["max_abs_err"]
        lines.append(
            f"| {r['name']} | {','.join(map(str, r['shape']))} | {r['kv_len']} | {ms['flash']:.4f} | "
            f"{ms['unfused']:.4f} | "
            f"{ms['torch_sdpa']:.4f} | {ms['torch_math']:.4f} | {ms['unfused'] / ms['flash']:.2f}x | "
            f"{ms['torch_sdpa'] / ms['flash']:.2f}x | {err['flash']:.2e} | {err['torch_sdpa']:.2e} | "
            + "; ".join(f"{k[6:]}: {ms[k]:.4f}, {err[k]:.1e}" for k in ms if k.startswith("flash:"))
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = kernel_bench.parser(__doc__, "flash_attention", number=10)
    p.add_argument("--only", help="run the shapes whose name contains this")
    p.add_argument("--variants", help="';'-separated warps,block_n[,m_tiles] kernels to time beside the default")
    args = p.parse_args()
    target = tvm.target.Target({"kind": "cuda", "arch": args.arch})
    cases = []
    for name, *dims in SHAPES:
        if args.only and args.only not in name:
            continue
        b, nq, nk, h, d = dims
        shape = AttentionShape(b, nq, nk, h, d)
        fields = {"name": name, "shape": [b, nq, h, d], "kv_len": nk}
        cases.append((fields, functools.partial(run_shape, name, shape, target, args)))
    return kernel_bench.record_cases(args, "flash_attention", cases, markdown)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Split-K convolutions against unsplit ones and PyTorch (cuDNN), shape by shape, on CUDA.

For each convolution of full-size SD1.5's UNet whose implicit GEMM has few output rows (batch 2 x 8x8 or
16x16 latents), on the same random float16 inputs: the graph mixed precision gives (``conv2d`` in
float32, cast to float16, bias add) compiled with ``mlcweb_passes.pipeline``:

- ``split N``: :class:`mlcweb_passes.SplitKConv` with N slices of input channels (``split 1`` is the
  unsplit convolution, what builds did before);
- ``chosen``: the count :func:`choose_splits` picks;
- ``torch``: ``torch.nn.functional.conv2d`` in float16, channels-last (cuDNN), bias included.

Every output is checked against a float32 PyTorch convolution of the same float16 inputs (max abs error,
``--atol``). Writes ``split_k.json`` and ``split_k.md`` into ``--results``. Times: medians of
``--repeat`` timings of ``--number`` calls each, CUDA events around them.

    python3 benchmarks/split_k.py --results $OUT
"""

from __future__ import annotations

import argparse
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
from mlcweb_passes.rewrites.split_k_conv import choose_splits  # noqa: E402

# (name, batch, height, width, in channels, out channels, kernel, stride): SD1.5's UNet at 512x512
SHAPES = [
    ("8x8 1280->1280", 2, 8, 8, 1280, 1280, 3, 1),
    ("8x8 2560->1280", 2, 8, 8, 2560, 1280, 3, 1),
    ("16x16->8x8 1280, stride 2", 2, 16, 16, 1280, 1280, 3, 2),
    ("16x16 1280->1280", 2, 16, 16, 1280, 1280, 3, 1),
    ("16x16 2560->1280", 2, 16, 16, 2560, 1280, 3, 1),
    ("16x16 640->1280", 2, 16, 16, 640, 1280, 3, 1),
    ("32x32->16x16 640, stride 2", 2, 32, 32, 640, 640, 3, 2),
    ("32x32 640->640", 2, 32, 32, 640, 640, 3, 1),
]
SPLITS = (1, 2, 4, 8, 16)


def conv_module(n: int, h: int, w: int, c: int, o: int, k: int, stride: int) -> tvm.IRModule:
    """NHWC float16 convolution as mixed precision leaves it: float32 out, cast, float16 bias add."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, h, w, c), "float16"))
    wt = relax.Var("w", relax.TensorType((o, k, k, c), "float16"))
    b = relax.Var("b", relax.TensorType((o,), "float16"))
    pad = k // 2
    with bb.function("main", [x, wt, b]):
        with bb.dataflow():
            y = bb.emit(
                relax.op.nn.conv2d(
                    x, wt, strides=stride, padding=pad, data_layout="NHWC", kernel_layout="OHWI", out_dtype="float32"
                )
            )
            y = bb.emit(relax.op.astype(y, "float16"))
            out = bb.emit_output(relax.op.add(y, b))
        bb.emit_func_output(out)
    return bb.get()


def run_shape(spec: tuple[Any, ...], target: tvm.target.Target, args: argparse.Namespace) -> dict[str, Any]:
    name, n, h, w, c, o, k, stride = spec
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, w, c, generator=gen).half().cuda()
    wt = (torch.randn(o, k, k, c, generator=gen) / (k * k * c) ** 0.5).half().cuda()
    b = torch.randn(o, generator=gen).half().cuda()
    x_nchw, w_oihw = x.permute(0, 3, 1, 2), wt.permute(0, 3, 1, 2)
    ref = torch.nn.functional.conv2d(x_nchw.float(), w_oihw.float(), b.float(), stride, k // 2)
    ref_np = ref.permute(0, 2, 3, 1).cpu().numpy()
    out_h, out_w = ref.shape[2:]
    chosen = choose_splits(n * out_h * out_w, o, c, k * k, args.sms or mp.gpu_facts(target).sm_count)
    row: dict[str, Any] = {"name": name, "gemm": [n * out_h * out_w, o, k * k * c], "chosen": chosen}
    row.update(ms={}, max_abs_err={}, compile_s={})
    args_tvm = [tvm.runtime.from_dlpack(t) for t in (x, wt, b)]
    mod = conv_module(n, h, w, c, o, k, stride)
    for splits in sorted({*SPLITS, chosen}):
        if c % (splits * 8):
            continue
        key = f"split {splits}"
        t0 = time.time()
        rewritten = mp.SplitKConv(splits=splits)(mod)
        with tvm.transform.PassContext(config=mp.async_copy_config(target)):
            exe = tvm.compile(rewritten, target, relax_pipeline=mp.pipeline(target, split_k=False))
        row["compile_s"][key] = round(time.time() - t0, 1)
        vm = relax.VirtualMachine(exe, tvm.cuda())
        got = vm["main"](*args_tvm).numpy().astype(np.float32)
        row["max_abs_err"][key] = float(np.abs(got - ref_np).max())
        row["ms"][key] = kernel_bench.time_ms(lambda vm=vm: vm["main"](*args_tvm), args.number, args.repeat)
    x_cl = x_nchw.contiguous(memory_format=torch.channels_last)
    w_cl = w_oihw.contiguous(memory_format=torch.channels_last)
    fn = lambda: torch.nn.functional.conv2d(x_cl, w_cl, b, stride, k // 2)  # noqa: E731
    row["max_abs_err"]["torch"] = float((fn().float() - ref).abs().max())
    row["ms"]["torch"] = kernel_bench.time_ms(fn, args.number, args.repeat)
    row["ok"] = all(err <= args.atol for key, err in row["max_abs_err"].items() if key != "torch")
    return row


def markdown(record: dict[str, Any]) -> str:
    heads = [f"split {s}" for s in SPLITS]
    lines = [
        f"# Split-K convolutions on {record['device']}",
        "",
        "float16 NHWC, 3x3, batch 2; ms per call (median) of the compiled graph (convolution, cast, bias); "
        "GEMM = rows x columns x reduction; chosen = `choose_splits`; error: max abs against float32 PyTorch.",
        "",
        "| convolution | GEMM | " + " | ".join(heads) + " | torch (cuDNN) | chosen | chosen / split 1 | torch / chosen "
        "| worst err | torch err |",
        "|---|---|" + "---|" * len(heads) + "---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error'][:100]} |")
            continue
        ms = r["ms"]
        cells = [f"{ms[h]:.4f}" if h in ms else "-" for h in heads]  # a chosen count off SPLITS shows in "chosen" only
        best = ms.get(f"split {r['chosen']}", float("nan"))
        ours = max(v for key, v in r["max_abs_err"].items() if key != "torch")
        lines.append(
            f"| {r['name']} | {'x'.join(map(str, r['gemm']))} | {' | '.join(cells)} | {ms['torch']:.4f} | "
            f"{r['chosen']} | {best / ms['split 1']:.2f} | {ms['torch'] / best:.2f}x | {ours:.2e} | "
            f"{r['max_abs_err']['torch']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    def options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--sms", type=int, help="multiprocessors for choose_splits (default: the device's)")

    return kernel_bench.main(__doc__, "split_k", 20, SHAPES, run_shape, markdown, options)


if __name__ == "__main__":
    sys.exit(main())

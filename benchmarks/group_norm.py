"""Channels-last group norm (SD1.5's UNet and VAE shapes) on the GPU this runs on: ``ChannelsLastNorm``
against ``RowReduction`` (what built them before; also with its consumer in the same kernel,
``fuse_below``) and PyTorch's float16 ``group_norm`` + SiLU on a channels-last tensor.

Each kernel is the fused PrimFunc the build makes of a resnet's group norm and SiLU (float16 NHWC ``x``
and weights, float32 statistics, 32 groups; :func:`group_norm_kernel`); every output is checked against
PyTorch float32. Writes ``group_norm.json`` and ``group_norm.md`` into ``--results``.

    python3 benchmarks/group_norm.py --results $OUT        # about a minute on an H100
"""

from __future__ import annotations

import argparse
import sys
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
from mlcweb_passes.schedules.channels_last_norm import ChannelsLastNorm  # noqa: E402
from mlcweb_passes.schedules.row_reduction import RowReduction  # noqa: E402

GROUPS = 32
# (where, batch, height, width, channels): the guided UNet's 64x64 level (and one 32x32 shape, which
# ChannelsLastNorm leaves to RowReduction), then the VAE decoder's levels.
SHAPES = [
    ("UNet 64x64", 2, 64, 64, 320),
    ("UNet 64x64", 2, 64, 64, 640),
    ("UNet 64x64", 2, 64, 64, 960),
    ("UNet 32x32", 2, 32, 32, 640),
    ("UNet 32x32", 2, 32, 32, 320),
    ("UNet 16x16", 2, 16, 16, 640),
    ("UNet 16x16", 2, 16, 16, 1280),
    ("UNet 8x8", 2, 8, 8, 1280),
    ("UNet 8x8", 2, 8, 8, 2560),
    ("VAE 64x64", 1, 64, 64, 512),
    ("VAE 128x128", 1, 128, 128, 512),
    ("VAE 256x256", 1, 256, 256, 512),
    ("VAE 256x256", 1, 256, 256, 256),
    ("VAE 512x512", 1, 512, 512, 256),
    ("VAE 512x512", 1, 512, 512, 128),
]
RULES = {
    "RowReduction": lambda: RowReduction(),
    "RowReduction one kernel": lambda: RowReduction(fuse_below=1 << 30),  # the consumer in the same kernel
    "ChannelsLastNorm": lambda: ChannelsLastNorm(),
}


def group_norm_kernel(shape: tuple[int, int, int, int]) -> tvm.tirx.PrimFunc:
    """The fused PrimFunc the build makes of a resnet's norm and SiLU: ``group_norm`` of a float16 NHWC
    ``x`` (statistics in float32 inside the op), then ``astype(silu(astype(y, f32)), f16)``."""
    channels = shape[-1]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float16"))
    gamma = relax.Var("gamma", relax.TensorType((channels,), "float16"))
    beta = relax.Var("beta", relax.TensorType((channels,), "float16"))
    with bb.function("main", [x, gamma, beta]):
        with bb.dataflow():
            y16 = bb.emit(relax.op.nn.group_norm(x, gamma, beta, GROUPS, channel_axis=3, axes=[1, 2]))
            y = bb.emit(relax.op.astype(y16, "float32"))
            out = bb.emit_output(relax.op.astype(relax.op.multiply(y, relax.op.sigmoid(y)), "float16"))
        bb.emit_func_output(out)
    fused = mp.FuseOperators()(bb.get())
    (func,) = [f for _, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return func.with_attr("global_symbol", "main")


def run_shape(spec: tuple[Any, ...], target: tvm.target.Target, args: argparse.Namespace) -> dict[str, Any]:
    where, *shape = spec
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen) * 2 + 0.5).half().cuda()  # a mean, as activations have
    gamma = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).half().cuda()
    beta = (0.1 * torch.randn(shape[-1], generator=gen)).half().cuda()
    nchw = x.permute(0, 3, 1, 2)  # a channels-last view, as PyTorch's NHWC modules hold it
    ref = torch.nn.functional.silu(torch.nn.functional.group_norm(nchw.float(), GROUPS, gamma.float(), beta.float()))
    ref_nhwc = ref.permute(0, 2, 3, 1).cpu().numpy()
    out = torch.empty(*shape, dtype=torch.float16, device="cuda")
    tensors = [tvm.runtime.from_dlpack(t) for t in (x, gamma, beta, out)]
    func = group_norm_kernel(tuple(shape))
    row: dict[str, Any] = {"name": where, "shape": shape, "ms": {}, "max_abs_err": {}}
    for key, rule in RULES.items():
        sch = rule().apply(func, target, False)
        if sch is None:
            continue
        kernel = tvm.compile(sch.mod, target)["main"]
        kernel(*tensors)
        row["max_abs_err"][key] = float(np.abs(out.float().cpu().numpy() - ref_nhwc).max())
        row["ms"][key] = kernel_bench.time_ms(_launcher(kernel, tensors), args.number, args.repeat)
    nchw_last = nchw.contiguous(memory_format=torch.channels_last)
    fn = lambda: torch.nn.functional.silu(torch.nn.functional.group_norm(nchw_last, GROUPS, gamma, beta))  # noqa: E731
    row["max_abs_err"]["torch"] = float(np.abs(fn().float().cpu().numpy() - ref.cpu().numpy()).max())
    row["ms"]["torch"] = kernel_bench.time_ms(fn, args.number, args.repeat)
    row["ok"] = all(err <= args.atol for err in row["max_abs_err"].values())
    return row


def _launcher(kernel: Any, tensors: list[Any]) -> Any:
    return lambda: kernel(*tensors)


def markdown(record: dict[str, Any]) -> str:
    keys = [*RULES, "torch"]
    lines = [
        f"# Channels-last group norm + SiLU on {record['device']}",
        "",
        "float16 NHWC input, 32 groups, float32 statistics, float16 output; ms per call (median); "
        "'-': the rule does not take the shape; error: max abs against float32 PyTorch.",
        "",
        "| where | N,H,W,C | " + " | ".join(keys) + " | RowReduction / ChannelsLastNorm | worst err |",
        "|---|---|" + "---|" * len(keys) + "---|---|",
    ]
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error'][:100]} |")
            continue
        ms = r["ms"]
        speedup = f"{ms['RowReduction'] / ms['ChannelsLastNorm']:.2f}x" if "ChannelsLastNorm" in ms else "-"
        lines.append(
            f"| {r['name']} | {','.join(map(str, r['shape']))} | "
            + " | ".join(f"{ms[k]:.4f}" if k in ms else "-" for k in keys)
            + f" | {speedup} | {max(r['max_abs_err'].values()):.2e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    return kernel_bench.main(__doc__, "group_norm", 20, SHAPES, run_shape, markdown)


if __name__ == "__main__":
    sys.exit(main())

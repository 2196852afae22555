"""Few-row GEMMs (SD1.5's time-embedding linears) on the GPU this runs on: ``SkinnyMatmul`` against
dlight's ``Matmul`` (what built them before) and PyTorch's float16 ``F.linear`` with bias.

Each kernel is ``linear(t, w) + b`` cast to float16, ``t`` of 2 rows (the guided batch), ``w`` stored
``[out, in]`` as after ``LinearWeightLayout``; every output is checked against PyTorch float32.
Writes ``skinny_matmul.json`` and ``skinny_matmul.md`` into ``--results``.

    python3 benchmarks/skinny_matmul.py --results $OUT        # about a minute on an H100
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
from tvm.s_tir import dlight as dl  # noqa: E402

import mlcweb_passes as mp  # noqa: E402
from mlcweb_passes.schedules.skinny_matmul import SkinnyMatmul  # noqa: E402

# (name, rows, in, out, calls per UNet step): the resnets' time_emb_proj and the time embedding's second
# linear. (Its first, 320 -> 1280, has a reduction that is not a multiple of 256: dlight keeps it.)
SHAPES = [
    ("time_emb_proj 1280", 2, 1280, 1280, 12),
    ("time_emb_proj 640", 2, 1280, 640, 5),
    ("time_emb_proj 320", 2, 1280, 320, 5),
    ("time_embedding linear_2", 2, 1280, 1280, 1),
]


def linear_kernel(rows: int, k: int, n: int) -> tvm.tirx.PrimFunc:
    """The fused PrimFunc the build makes of ``astype(linear(t, w) + b, float16)``."""
    bb = relax.BlockBuilder()
    t = relax.Var("t", relax.TensorType((rows, k), "float16"))
    w = relax.Var("w", relax.TensorType((n, k), "float16"))
    b = relax.Var("b", relax.TensorType((n,), "float32"))
    with bb.function("main", [t, w, b]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(t, relax.op.permute_dims(w), out_dtype="float32"))
            out = bb.emit_output(relax.op.astype(relax.op.add(y, b), "float16"))
        bb.emit_func_output(out)
    fused = mp.FuseOperators()(mp.LinearWeightLayout()(bb.get()))
    (func,) = [f for _, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return func.with_attr("global_symbol", "main")


def run_shape(spec: tuple[Any, ...], target: tvm.target.Target, args: argparse.Namespace) -> dict[str, Any]:
    name, rows, k, n, calls = spec
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(rows, k, generator=gen).half().cuda()
    w = (torch.randn(n, k, generator=gen) / k**0.5).half().cuda()
    b = torch.randn(n, generator=gen).cuda()
    ref = (t.float() @ w.float().T + b).cpu().numpy()
    out = torch.empty(rows, n, dtype=torch.float16, device="cuda")
    tensors = [tvm.runtime.from_dlpack(x) for x in (t, w, b, out)]
    func = linear_kernel(rows, k, n)
    row: dict[str, Any] = {"name": name, "gemm": [rows, n, k], "calls_per_step": calls, "ms": {}, "max_abs_err": {}}
    for key, rule in (("dlight Matmul", dl.gpu.Matmul()), ("SkinnyMatmul", SkinnyMatmul())):
        sch = rule.apply(func, target, False)
        assert sch is not None, f"{key} did not schedule {name}"
        kernel = tvm.compile(sch.mod, target)["main"]
        kernel(*tensors)
        row["max_abs_err"][key] = float(np.abs(out.float().cpu().numpy() - ref).max())
        row["ms"][key] = kernel_bench.time_ms(_launcher(kernel, tensors), args.number, args.repeat)
    bias16 = b.half()
    fn = lambda: torch.nn.functional.linear(t, w, bias16)  # noqa: E731
    row["max_abs_err"]["torch"] = float(np.abs(fn().float().cpu().numpy() - ref).max())
    row["ms"]["torch"] = kernel_bench.time_ms(fn, args.number, args.repeat)
    row["ok"] = all(err <= args.atol for err in row["max_abs_err"].values())
    return row


def _launcher(kernel: Any, tensors: list[Any]) -> Any:
    return lambda: kernel(*tensors)


def markdown(record: dict[str, Any]) -> str:
    keys = ["dlight Matmul", "SkinnyMatmul", "torch"]
    lines = [
        f"# Few-row GEMMs on {record['device']}",
        "",
        "float16 inputs, float32 accumulation and bias, float16 output; ms per call (median); "
        "GEMM = rows x columns x reduction; error: max abs against float32 PyTorch.",
        "",
        "| GEMM | rows x cols x K | calls/step | " + " | ".join(keys) + " | torch / Skinny | worst err |",
        "|---|---|---|" + "---|" * len(keys) + "---|---|",
    ]
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error'][:100]} |")
            continue
        ms = r["ms"]
        lines.append(
            f"| {r['name']} | {'x'.join(map(str, r['gemm']))} | {r['calls_per_step']} | "
            + " | ".join(f"{ms[key]:.4f}" for key in keys)
            + f" | {ms['torch'] / ms['SkinnyMatmul']:.2f}x | {max(r['max_abs_err'].values()):.2e} |"
        )
    step = {key: sum(r["ms"][key] * r["calls_per_step"] for r in record["rows"] if "ms" in r) for key in keys}
    lines += ["", "Per UNet step: " + ", ".join(f"{key} {v:.3f} ms" for key, v in step.items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    return kernel_bench.main(__doc__, "skinny_matmul", 50, SHAPES, run_shape, markdown)


if __name__ == "__main__":
    sys.exit(main())

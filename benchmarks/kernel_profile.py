#!/usr/bin/env python3
"""Where a model's time goes, kernel by kernel, on the GPU this runs on.

Lowers full-size SD1.5 (float16, CUDA) exactly as ``mlcweb build`` does, up to the scheduled kernels
(database and default rules applied, memory planned), compiles every kernel into one library and
times each alone on random inputs (``time_evaluator``: back-to-back calls on the same inputs, so small
kernels run with a warm L2, as they mostly do inside a step). Each kernel's time times its calls per
function gives the function's kernel time, to compare with ``sd_gpu.py``'s (on the H100 the UNet's
kernels alone sum to a little more than its CUDA-graph step: gaps between launches cost nothing
visible). Writes ``<name>.json`` and ``<name>.md`` into ``--results``: per function, its kernels by
total time, grouped by kind (GEMM, attention, norm, ...) and by schedule source (tuned, default rule,
hand-written).

On the GPU machine (benchmarks/README.md), about 4.5 minutes::

    python3 benchmarks/kernel_profile.py --results $OUT
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples" / "stable_diffusion")]

import tvm  # noqa: E402
from tvm import relax, tirx  # noqa: E402

import mlcweb_passes as mp  # noqa: E402
from mlcweb_passes._tir import SOURCE_ATTR  # noqa: E402
from mlcweb_passes.cuda.wgmma_compile import external_modules  # noqa: E402

# Kinds by the first operator a fused kernel's name mentions, most specific first.
KINDS = [
    ("attention", r"flash|attention|softmax"),
    ("group norm", r"group_norm"),
    ("layer norm", r"layer_norm"),
    ("GEMM", r"matmul|conv2d|dense"),
    ("split-K sum", r"sum"),
    ("reduction", r"mean|max|variance"),
    ("layout / copy", r"transpose|reshape|concat|split|strided_slice|take|broadcast"),
]


def kind(name: str) -> str:
    for label, pattern in KINDS:
        if re.search(pattern, name):
            return label
    return "elementwise"


def scheduled_module(args: argparse.Namespace) -> tvm.IRModule:
    """The build's module after scheduling and memory planning (``mlcweb.build._lower``'s first half)."""
    import mlcweb_stable_diffusion.plugin as plugin

    from mlcweb.build import BuildOptions, lower_until, resolve
    from mlcweb.databases import shipped_database
    from mlcweb.plugins import PluginHost
    from mlcweb.targets import resolve_target

    host = PluginHost([("stable_diffusion", plugin)], entry_points=False)
    database = None if args.no_db else shipped_database(resolve_target("cuda", arch=args.arch))
    options = BuildOptions(
        target="cuda",
        out=Path(tempfile.mkdtemp()),
        dtype="float16",
        config={"size": args.size},
        arch=args.arch,
        database=database,
    )
    # Through memory planning: it turns pure reshape kernels into views, which launch nothing.
    return lower_until(host, resolve(host, "stable-diffusion", options), "memory")


def launches(mod: tvm.IRModule) -> dict[str, Counter[str]]:
    """Per Relax function, the kernels it launches and how often (after memory planning a launch is a
    call of the PrimFunc's GlobalVar)."""
    kernels = {gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    counts: dict[str, Counter[str]] = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        found: Counter[str] = Counter()

        def visit(expr: relax.Expr, found: Counter[str] = found) -> None:
            op = expr.op if isinstance(expr, relax.Call) else None
            if isinstance(op, tvm.ir.GlobalVar) and op.name_hint in kernels:
                found[op.name_hint] += 1

        relax.analysis.post_order_visit(func.body, visit)
        if found:
            counts[gv.name_hint] = found
    return counts


def compile_kernels(mod: tvm.IRModule, names: set[str], target: tvm.target.Target) -> Any:
    kernels = {
        name: func.with_attr("global_symbol", name)
        for gv, func in mod.functions_items()
        if isinstance(func, tirx.PrimFunc) and (name := gv.name_hint) in names
    }
    with target, tvm.transform.PassContext(config=mp.async_copy_config(target)):
        lib = tvm.compile(tvm.IRModule(kernels), target)
    for external in external_modules(mod):  # WgmmaGemm's kernels, which its launchers call
        lib.mod.import_module(external)
    return lib, kernels


def random_inputs(func: tirx.PrimFunc, dev: Any, rng: np.random.Generator) -> list[Any]:
    """One tensor on ``dev`` per parameter of ``func``: floats uniform in [-1, 1], integers zero."""
    arrays = []
    for buf in func.params:  # TVM 0.27: a PrimFunc's params are its buffers
        shape = [int(d) for d in buf.shape]
        dtype = str(buf.dtype)
        # Indices (token ids, timesteps) as zeros: in range for every gather.
        data = np.zeros(shape, dtype) if "int" in dtype else rng.uniform(-1, 1, shape).astype(dtype)
        arrays.append(tvm.runtime.tensor(data, dev))
    return arrays


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, required=True, help="folder for <name>.json / .md")
    ap.add_argument("--name", default="kernel_profile")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--size", default="full", help="the model config's size (full, tiny)")
    ap.add_argument("--no-db", action="store_true", help="without the shipped database: default rules only")
    ap.add_argument("--number", type=int, default=20, help="calls per timing")
    ap.add_argument("--repeat", type=int, default=5, help="timings per median")
    ap.add_argument("--top", type=int, default=40, help="kernels listed per function in the Markdown")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t0 = time.time()
    mod = scheduled_module(args)
    counts = launches(mod)
    names = {n for c in counts.values() for n in c}
    from mlcweb.targets import resolve_target

    target = resolve_target("cuda", arch=args.arch).tvm_target()
    lib, kernels = compile_kernels(mod, names, target)
    print(f"{len(names)} kernels lowered and compiled in {time.time() - t0:.0f} s", flush=True)
    dev = tvm.cuda(0)
    rng = np.random.default_rng(0)
    runnable = lib.jit()
    ms: dict[str, float] = {}
    for name in sorted(names):
        inputs = random_inputs(kernels[name], dev, rng)
        timer = runnable.time_evaluator(name, dev, number=args.number, repeat=args.repeat)
        ms[name] = float(np.median(timer(*inputs).results)) * 1e3
        del inputs
    source = {
        n: str(f.attrs[SOURCE_ATTR]) if f.attrs is not None and SOURCE_ATTR in f.attrs else "none"
        for n, f in kernels.items()
    }
    record = {
        "device": dev.device_name,
        "date": time.strftime("%Y-%m-%d"),
        "arch": args.arch,
        "size": args.size,
        "database": not args.no_db,
        "functions": {
            func: sorted(
                (
                    {"kernel": n, "calls": c, "ms": ms[n], "total_ms": c * ms[n], "kind": kind(n), "source": source[n]}
                    for n, c in found.items()
                ),
                key=lambda r: -r["total_ms"],
            )
            for func, found in sorted(counts.items())
        },
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    (args.results / f"{args.name}.md").write_text(markdown(record, args.top))
    print(markdown(record, 15), flush=True)
    return 0


def _grouped(rows: list[dict[str, Any]], key: str) -> list[str]:
    total = sum(r["total_ms"] for r in rows) or 1.0
    sums: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    for r in rows:
        sums[r[key]] += r["total_ms"]
        calls[r[key]] += r["calls"]
    return [f"| {k} | {calls[k]} | {v:.3f} | {100 * v / total:.0f}% |" for k, v in sums.most_common()]


def markdown(record: dict[str, Any], top: int) -> str:
    lines = [
        f"# Kernel time per function on {record['device']}, {record['date']}",
        "",
        f"SD1.5 ({record['size']}) float16, {record['arch']}, "
        f"{'shipped database + default rules' if record['database'] else 'default rules only'}. "
        "Each kernel timed alone (median, warm L2); total = calls x ms.",
    ]
    for func, rows in record["functions"].items():
        total = sum(r["total_ms"] for r in rows)
        launches = sum(r["calls"] for r in rows)
        lines += ["", f"## {func}: {total:.3f} ms in {launches} launches of {len(rows)} kernels", ""]
        lines += ["| kind | launches | ms | share |", "|---|---|---|---|", *_grouped(rows, "kind"), ""]
        lines += ["| schedule | launches | ms | share |", "|---|---|---|---|", *_grouped(rows, "source"), ""]
        lines += ["| kernel | kind | schedule | calls | ms per call | total ms |", "|---|---|---|---|---|---|"]
        for r in rows[:top]:
            lines.append(
                f"| `{r['kernel'][:70]}` | {r['kind']} | {r['source']} | {r['calls']} | {r['ms']:.4f} "
                f"| {r['total_ms']:.3f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

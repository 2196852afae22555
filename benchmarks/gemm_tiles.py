"""Tensor-core tiles against dlight's default, kernel by kernel, on the GPU this runs on.

Takes the float16 GEMM kernels of a model (matmuls and NHWC convolutions after fusion; by default full-size
SD1.5's, extracted as ``mlcweb tune`` would) and, for each, builds and times:

- ``dlight``: dlight's default GPU rules alone (``MatmulTensorization``'s one 128x128 tile);
- ``chosen``: ``TensorCoreMatmul`` with the tile :func:`choose_tile` picks;
- every tile of ``--tiles`` (default: a dozen common shapes).

Each schedule's output is checked against dlight's on the same random inputs (max abs error relative to
the output's scale, ``--rtol``). Writes ``gemm_tiles.json`` and ``gemm_tiles.md`` (per kernel: ms of
each, the best tile; and the weighted sum over a whole model step) into ``--results``.

    python3 benchmarks/gemm_tiles.py --results $OUT                  # extracts the tasks (~1 min)
    python3 benchmarks/gemm_tiles.py --tasks tasks.json --results $OUT --top 40
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples" / "stable_diffusion")]

import tvm  # noqa: E402
from kernel_profile import random_inputs  # noqa: E402
from tvm.s_tir import dlight as dl  # noqa: E402

from mlcweb_passes.cuda.tensor_core_matmul import TensorCoreMatmul, TensorCoreTile, choose_tile, gemm_shape  # noqa: E402
from mlcweb_passes.schedules.apply_database import preload_tensor_intrinsics  # noqa: E402
from mlcweb_passes.targets import async_copy_config, gpu_facts  # noqa: E402

DEFAULT_TILES = [
    "2,2,4,4,2",
    "2,4,4,2,2",
    "4,2,2,4,2",
    "4,4,2,2,2",
    "2,2,4,4,4",
    "4,4,2,2,4",
    "2,2,4,2,2",
    "4,2,2,2,2",
    "2,2,2,4,2",
    "2,4,2,2,2",
    "2,2,2,2,2",
    "4,2,1,2,2",
    "2,2,4,3,2",
    "2,2,2,3,2",
    "2,1,4,3,2",
    "4,1,2,3,2",
    "4,1,4,4,2",
]


def _target(arch: str) -> tvm.target.Target:
    return tvm.target.Target({"kind": "cuda", "arch": arch, "max_num_threads": 1024, "thread_warp_size": 32})


def _tasks(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.tasks:
        return list(json.loads(Path(args.tasks).read_text()))
    from mlcweb.model import BuildOptions
    from mlcweb.plugins import PluginHost
    from mlcweb.tune import TuneOptions, extract_tuning_tasks

    db = Path(tempfile.mkdtemp())
    build = BuildOptions(target="cuda", out=db, dtype="float16", config={"size": "full"}, arch=args.arch)
    options = TuneOptions(build=build, db=db, wgmma=False)  # the GEMMs as TIR, for every variant to build from
    tasks, _ = extract_tuning_tasks(PluginHost(), "stable-diffusion", options)
    return [{"name": t.name, "weight": t.weight, "script": t.mod.script()} for t in tasks]


def _gemm(script: str, arch: str, wgmma: bool = False) -> Any:
    """The task's GEMM shape when TensorCoreMatmul takes it (and with ``wgmma``, WgmmaGemm), else None."""
    func = tvm.script.from_source(script)["main"]
    sch = tvm.s_tir.Schedule(func)
    from tvm.s_tir.dlight.gpu.matmul import get_reduction_blocks

    blocks = get_reduction_blocks(sch, sch.get_child_blocks(sch.get_sblock("root")))
    if not blocks:
        return None
    shape = gemm_shape(sch.get(blocks[0]))
    if shape is None:
        return None
    if TensorCoreMatmul(tile=TensorCoreTile()).apply(func, _target(arch), False) is None:
        return None
    if wgmma:
        from mlcweb_passes.cuda.wgmma_plan import UnsupportedGemmError, plan_kernel

        try:
            plan_kernel(func, "probe", gpu_facts(_target(arch)).sm_count)
        except UnsupportedGemmError:
            return None
    return shape


def _build(job: tuple[str, str, str, str, str]) -> tuple[str, str | None, str | None]:
    """Worker: schedule one task with one variant and export it; (key, library path, error)."""
    key, script, variant, arch, out = job
    variant, _, mode = variant.partition("/")  # "/sync": without asynchronous copies
    preload_tensor_intrinsics()
    target = _target(arch)
    func = tvm.script.from_source(script)["main"].with_attr("global_symbol", "main")
    try:
        if variant.startswith("wgmma"):
            lib = _build_wgmma(func, variant, target)
        else:
            lib = _build_scheduled(func, variant, mode, target)
            if lib is None:
                return key, None, "rule did not apply"
        path = os.path.join(out, f"{abs(hash(key))}.so")
        lib.export_library(path)
        return key, path, None
    except Exception as err:
        return key, None, f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:200]}"


def _build_scheduled(func: Any, variant: str, mode: str, target: Any) -> Any:
    """``dlight``, ``chosen`` or a TensorCoreMatmul tile: the scheduled kernel, compiled; None when the
    tile rule does not take it."""
    if variant == "dlight":
        rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
        rule: Any = None
    else:
        tile = None if variant == "chosen" else _tile(variant)
        rule = TensorCoreMatmul(tile=tile)
        rules = [rule, dl.gpu.Fallback()]
    with target:
        mod = dl.ApplyDefaultSchedule(*rules)(tvm.IRModule({"main": func}))
    if rule is not None and "mma" not in mod.script():  # wmma or mma.sync
        return None
    with tvm.transform.PassContext(config={} if mode == "sync" else async_copy_config(target)):
        return tvm.compile(mod, target)


def _build_wgmma(func: Any, variant: str, target: Any) -> Any:
    """``wgmma`` (the chosen tile) or ``wgmma:block_n,stages``: the WgmmaGemm kernel, compiled."""
    from mlcweb_passes.cuda.wgmma_compile import compile_kernels, launcher
    from mlcweb_passes.cuda.wgmma_plan import plan_kernel
    from mlcweb_passes.cuda.wgmma_source import WgmmaTile

    spec = variant.partition(":")[2]
    tile = WgmmaTile(*map(int, spec.split(","))) if spec else None
    kernel = plan_kernel(func, "mlcweb_wgmma_main", gpu_facts(target).sm_count, tile=tile)
    lib = tvm.compile(tvm.IRModule({"main": launcher(func, kernel).with_attr("global_symbol", "main")}), target)
    lib.mod.import_module(compile_kernels([kernel]))
    return lib


def _tile(text: str) -> TensorCoreTile:
    """``warps_m,warps_n,frags_m,frags_n,chunk_k``: ``2,2,4,4,2``."""
    return TensorCoreTile(*map(int, text.split(",")))


def _inputs(script: str, dev: Any, seed: int) -> list[Any]:
    return random_inputs(tvm.script.from_source(script)["main"], dev, np.random.default_rng(seed))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", help="tasks JSON (name, weight, script); default: extract full SD1.5's")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument(
        "--tiles",
        default=";".join(DEFAULT_TILES),
        help="';'-separated warps_m,warps_n,frags_m,frags_n,chunk_k (see _tile)",
    )
    ap.add_argument("--wgmma-only", action="store_true", help="only the kernels WgmmaGemm takes")
    ap.add_argument("--top", type=int, default=0, help="only the N heaviest kernels (weight x FLOPs)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sync", action="store_true", help="also each variant without asynchronous copies")
    ap.add_argument("--rtol", type=float, default=2e-2)
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default="gemm_tiles")
    args = ap.parse_args()
    t0 = time.time()
    tasks = []
    for task in _tasks(args):
        shape = _gemm(task["script"], args.arch, args.wgmma_only)
        if shape is not None:
            tasks.append({**task, "shape": shape})
    tasks.sort(key=lambda t: -t["weight"] * t["shape"].m * t["shape"].n * t["shape"].k * t["shape"].batch)
    if args.top:
        tasks = tasks[: args.top]
    variants = ["dlight", "chosen", *[v for v in args.tiles.split(";") if v]]
    if args.sync:
        variants += [f"{v}/sync" for v in variants]
    print(f"{len(tasks)} GEMM kernels x {len(variants)} variants ({time.time() - t0:.0f} s)", flush=True)
    out = tempfile.mkdtemp()
    jobs = [(f"{t['name']}|{v}", t["script"], v, args.arch, out) for t in tasks for v in variants]
    built: dict[str, tuple[str | None, str | None]] = {}
    # spawn, not fork: the parent has initialised CUDA (cuda Targets query the device)
    with cf.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for key, path, err in pool.map(_build, jobs, chunksize=1):
            built[key] = (path, err)
    failed = sum(1 for _, err in built.values() if err)
    print(f"built in {time.time() - t0:.0f} s; {failed} of {len(jobs)} failed", flush=True)
    for key, (_, err) in sorted(built.items()):
        if err:
            print(f"  {key}: {err}", flush=True)

    rows = []
    ctx = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(1, mp_context=ctx)  # one CUDA process, replaced when a kernel kills it
    progress = Path(out) / "progress.txt"
    for i, task in enumerate(tasks):
        times: dict[str, float | None] = {}
        errors: dict[str, str] = {}
        todo = []
        for v in variants:
            path, err = built[f"{task['name']}|{v}"]
            if path is None:
                times[v], errors[v] = None, err or "?"
            else:
                todo.append((v, path))
        while todo:
            progress.write_text("")
            try:
                measured = pool.submit(_measure, task["script"], i, todo, args.rtol, str(progress)).result()
            except cf.process.BrokenProcessPool:
                # A kernel faulted and took the CUDA context with it: note it, rerun the others in a new
                # process (those measured before the fault are lost with the process).
                started = progress.read_text().split()
                crashed = started[-1] if started else todo[0][0]
                measured = {crashed: (None, "crashed the process (CUDA fault)")}
                pool.shutdown(wait=False)
                pool = cf.ProcessPoolExecutor(1, mp_context=ctx)
            for v, (ms, err) in measured.items():
                times[v] = ms
                if err:
                    errors[v] = err
            todo = [(v, p) for v, p in todo if v not in measured]
        shape = task["shape"]
        valid = {v: ms for v, ms in times.items() if ms is not None and v not in ("dlight", "chosen")}
        best = min(valid, key=lambda v: valid[v]) if valid else None
        rows.append(
            {
                "name": task["name"],
                "weight": task["weight"],
                "shape": [shape.batch, shape.m, shape.n, shape.k],
                "chosen_tile": str(choose_tile(shape, gpu_facts(_target(args.arch)))),
                "ms": times,
                "errors": errors,
                "best": best,
            }
        )
        print(
            task["name"][:50],
            [shape.batch, shape.m, shape.n, shape.k],
            {k: v and round(v, 4) for k, v in times.items()},
            flush=True,
        )
        if errors:
            print("   errors:", errors, flush=True)
        _write(args, rows, variants)  # after every kernel: a run cut short still leaves its table
    pool.shutdown()
    _write(args, rows, variants)
    return 0


def _measure(
    script: str, seed: int, variants: list[tuple[str, str]], rtol: float, progress: str
) -> dict[str, tuple[float | None, str | None]]:
    """Worker: run and time each variant's library on one set of inputs; the first valid output is the
    reference (dlight's when it is first). Appends each variant's name to ``progress`` before running it,
    so the parent knows which one faulted if this process dies."""
    dev = tvm.cuda(0)
    reference = None
    results: dict[str, tuple[float | None, str | None]] = {}
    for v, path in variants:
        with open(progress, "a") as f:
            f.write(v + "\n")
        try:
            inputs = _inputs(script, dev, seed)
            lib = tvm.runtime.load_module(path)
            lib["main"](*inputs)
            got = inputs[-1].numpy().astype(np.float32)
        except Exception as err:
            results[v] = (None, f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:200]}")
            continue
        if reference is None:
            reference = got
        scale = max(1e-6, float(np.abs(reference).max()))
        error = float(np.abs(got - reference).max()) / scale
        if not np.isfinite(error) or error > rtol:
            results[v] = (None, f"wrong: relative error {error:.3g}")
            continue
        timer = lib.time_evaluator("main", dev, number=20, repeat=5, min_repeat_ms=0)
        results[v] = (float(np.median(timer(*inputs).results)) * 1e3, None)
    return results


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], variants: list[str]) -> None:
    args.results.mkdir(parents=True, exist_ok=True)
    totals = {v: sum(r["weight"] * (r["ms"].get(v) or float("nan")) for r in rows) for v in variants}
    best_total = sum(
        r["weight"] * min(x for x in r["ms"].values() if x is not None) for r in rows if any(r["ms"].values())
    )
    doc = {
        "device": tvm.cuda(0).device_name,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
        "weighted_ms": totals,
        "best_weighted_ms": best_total,
    }
    (args.results / f"{args.name}.json").write_text(json.dumps(doc, indent=1, default=str))
    lines = [
        f"# Tensor-core tiles per GEMM kernel on {doc['device']}, {doc['date']}",
        "",
        "ms per call (median); tiles are warps_m,warps_n,frags_m,frags_n,chunk_k; '-' failed or wrong.",
        "",
        "| kernel | B,M,N,K | runs | dlight | chosen | best tile | best |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r["ms"]
        f = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
        best = r["best"]
        lines.append(
            f"| `{r['name'][:40]}` | {','.join(map(str, r['shape']))} | {r['weight']:g} | {f(ms.get('dlight'))} "
            f"| {f(ms.get('chosen'))} | {best or '-'} | {f(ms.get(best) if best else None)} |"
        )
    lines += ["", "Weighted sum (runs x ms) over these kernels:", "", "| variant | ms |", "|---|---|"]
    lines += [f"| {v} | {t:.2f} |" for v, t in totals.items()]
    lines += [f"| best per kernel | {best_total:.2f} |"]
    (args.results / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Tune WebGPU GEMM tiles on a real GPU through Dawn: every GEMM shape of a model's webgpu build, each
candidate tile (``mlcweb_passes.webgpu.gemm.tile_candidates``) timed in node + Dawn + tvmjs, the
fastest written to a tile table (``webgpu_gemm_tiles.json``) that builds apply.

MetaSchedule cannot measure in a browser, and its CUDA stand-in (``mlcweb tune --target webgpu``) does
not rank WGSL tiles as Dawn runs them; this measures the kernels the build ships, on the runtime that
runs them::

    # here: the model's kernels (its lowering up to scheduling), one library per candidate index
    python benchmarks/webgpu_tiles.py build --out .dev/tiles --dtype float16 [--size full]
    python benchmarks/sd_webgpu.py pack --builds .dev/nobuilds --kernels .dev/tiles --out .dev

    # on the GPU machine (carrying .dev/wgpu-a, -b, -c; no TVM needed): webgpu_kernels.py's runner
    python3 benchmarks/webgpu_kernels.py run --carry .dev --results $OUT --repeat 20 --warm-ms 150

    # here: the fastest tile per shape, checked against the rule's own tile's output
    python benchmarks/webgpu_tiles.py pick RESULTS_DIR --kernels .dev/tiles --out mlcweb/databases/webgpu

Library ``c<j>`` holds, for every shape with more than ``j`` candidates, one function running the
shape's heaviest kernel (its fused epilogue included) with candidate ``j``'s tile; candidate 0 is the
rule's own choice, so ``pick`` compares every tile with what builds do without a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REL_RMS = {"float16": 2e-2, "float32": 1e-4}  # candidates' outputs against the rule's tile's
# A function timed after the GPU idled (reading back the previous function's output) can run several
# times slower than in the model; with --profile, a shape whose rule's tile took more than this times
# its time in the model's profile is left to the rule.
INFLATED = 1.15


@dataclasses.dataclass
class Shape:
    """One GEMM shape of the model: its heaviest kernel, how often its kernels run for one use."""

    gemm: Any  # mlcweb_passes.webgpu.gemm.GemmShape
    kernel: str
    runs: int = 0
    kernels: list[str] = dataclasses.field(default_factory=list)

    @property
    def key(self) -> str:
        return str(self.gemm.key)


def _calls(mod: Any, runs_per_use: dict[str, int]) -> tuple[Counter[str], dict[str, Any]]:
    """How often each PrimFunc runs for one use of the model (calls per entry function times its runs
    per use), and one ``call_tir`` of each (for its arguments' and result's struct info)."""
    import tvm
    from tvm import relax

    counts: Counter[str] = Counter()
    first: dict[str, Any] = {}
    call_tir = tvm.ir.Op.get("relax.call_tir")
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        for block in func.body.blocks:
            for binding in block.bindings:
                value = binding.value
                if isinstance(value, relax.Call) and value.op.same_as(call_tir):
                    name = value.args[0].name_hint
                    counts[name] += runs_per_use.get(gv.name_hint, 1)
                    first.setdefault(name, value)
    return counts, first


def _shapes(mod: Any, runs_per_use: dict[str, int]) -> tuple[list[Shape], dict[str, Any]]:
    """The model's GEMM shapes that ``WebGPUMatmul`` tiles, heaviest (runs x FLOPs) first."""
    from tvm import relax, tirx

    import mlcweb_passes as mp
    from mlcweb_passes.webgpu.gemm import gemm_shape

    counts, calls = _calls(mod, runs_per_use)
    shapes: dict[str, Shape] = {}
    for gv, func in mod.functions_items():
        name = gv.name_hint
        call = calls.get(name)
        if not isinstance(func, tirx.PrimFunc) or mp.is_scheduled(func) or call is None or len(call.args) != 2:
            continue  # hand-written kernels (flash attention) have no tiles
        if not isinstance(call.ty, relax.TensorType):
            continue  # several results
        shape = gemm_shape(func)
        if shape is None or min(shape.m, shape.n, shape.k) < 32:
            continue
        entry = shapes.setdefault(shape.key, Shape(shape, name))
        entry.runs += counts[name]
        entry.kernels.append(name)
    ordered = sorted(shapes.values(), key=lambda s: (-s.runs * s.gemm.flops, s.key))
    return ordered, calls


def _library_module(mod: Any, shapes: list[Shape], calls: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    """A Relax module with one function ``g<i>`` per shape, a ``call_tir`` of the shape's kernel on
    fresh inputs, and the specs ``kernels.mjs`` reads for each."""
    from tvm import relax

    bb = relax.BlockBuilder()
    specs = []
    for index, shape in enumerate(shapes):
        call = calls[shape.kernel]
        kernel = bb.add_func(mod[shape.kernel], shape.kernel)
        params = [relax.Var(f"x{i}", arg.ty) for i, arg in enumerate(call.args[1].fields)]
        name = f"g{index}"
        with bb.function(name, params):
            with bb.dataflow():
                out = bb.emit_output(relax.call_tir(kernel, params, call.ty))
            bb.emit_func_output(out)
        inputs = [
            {
                "name": f"{shape.kernel}/x{i}",
                "shape": [int(d) for d in v.ty.shape],
                "dtype": str(v.ty.dtype),
            }
            for i, v in enumerate(params)
        ]
        specs.append({"name": name, "key": shape.key, "flops": shape.gemm.flops, "time": "all", "inputs": inputs})
    return bb.get(), specs


def build(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    import mlcweb_passes as mp
    from mlcweb.build import lower_until, resolve
    from mlcweb.model import BuildOptions
    from mlcweb.plugins import PluginHost
    from mlcweb_passes.webgpu.gemm import tile_candidates

    sys.path.insert(0, str(HERE))
    from webgpu_kernels import _compile, _target, _write_library

    host = PluginHost()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        options = BuildOptions(
            target="webgpu",
            out=Path(tmp) / "build",
            dtype=args.dtype,
            config={"size": args.size},
            use_shipped_database=False,
        )
        resolved = resolve(host, args.model, options, link=False)
        mod = lower_until(host, resolved, "kernels")
    shapes, calls = _shapes(mod, resolved.registered.spec.runs_per_use)
    shapes = shapes[: args.max_shapes] if args.max_shapes else shapes
    target = _target()
    threads, shared = int(target.attrs["max_num_threads"]), int(target.attrs["max_shared_memory_per_block"])
    candidates = {s.key: tile_candidates(s.gemm, threads, shared) for s in shapes}
    if args.prior:
        shapes, candidates = _finalists(shapes, candidates, Path(args.prior), args.top)
    index = {
        "model": args.model,
        "size": args.size,
        "dtype": args.dtype,
        "shapes": [
            {**dataclasses.asdict(s), "key": s.key, "candidates": [dataclasses.asdict(t) for t in candidates[s.key]]}
            for s in shapes
        ],
    }
    (out / "tiles-index.json").write_text(json.dumps(index, indent=1))
    print(f"{len(shapes)} GEMM shapes, {sum(len(c) for c in candidates.values())} candidate kernels", flush=True)
    for j in range(max(len(c) for c in candidates.values())):
        chosen = [s for s in shapes if len(candidates[s.key]) > j]
        module, specs = _library_module(mod, chosen, calls)
        pipeline_options = mp.PipelineOptions(
            dtype=args.dtype, webgpu_tiles={s.key: candidates[s.key][j] for s in chosen}
        )
        dest = out / f"tiles-c{j}-{args.dtype}"
        _write_library(dest, _compile(module, target, pipeline_options, after="kernels"), f"c{j}", args.dtype, specs)
        print(f"built {dest}: {len(chosen)} kernels", flush=True)
    return 0


def _finalists(
    shapes: list[Shape], candidates: dict[str, list[Any]], prior: Path, top: int
) -> tuple[list[Shape], dict[str, list[Any]]]:
    """A second round from a first one's results (``prior``: its ``--results``, with the first build's
    ``tiles-index.json`` copied in): only the shapes where a candidate beat the rule's tile, each with the
    rule's tile and the ``top`` fastest others. A GPU that idled before a function (reading back the
    previous one's output) can time it several times too slow, so first-round winners are re-timed."""
    from mlcweb_passes.webgpu.gemm import WebGPUTile

    index = json.loads((prior / "tiles-index.json").read_text())
    runs = {}
    for path in prior.glob("kernels-tiles-c*.json"):
        result = json.loads(path.read_text())
        runs[int(result["variant"].removeprefix("c"))] = result["kernels"]
    kept, finalists = [], {}
    for i, entry in enumerate(index["shapes"]):
        if entry["key"] not in candidates:
            continue
        timed = sorted(
            (runs[j][f"g{i}"]["gemm_ms"], j) for j in range(len(entry["candidates"])) if f"g{i}" in runs.get(j, {})
        )
        if not timed or timed[0][1] == 0:
            continue  # the rule's tile won
        rule = candidates[entry["key"]][0]
        others = [WebGPUTile(**entry["candidates"][j]) for _, j in timed if j != 0][:top]
        finalists[entry["key"]] = [rule, *others]
        kept.append(next(s for s in shapes if s.key == entry["key"]))
    return kept, finalists


def pick(args: argparse.Namespace) -> int:
    """The fastest tile of each shape whose output matches the rule's tile's, into ``--out``'s table."""
    sys.path.insert(0, str(ROOT))
    from mlcweb_passes.webgpu.gemm import TILE_TABLE_FILE, WebGPUTile

    sys.path.insert(0, str(HERE))
    from webgpu_kernels import _rel_rms

    index = json.loads((Path(args.kernels) / "tiles-index.json").read_text())
    runs = {}
    for path in sorted(Path(args.results).glob("kernels-tiles-c*.json")):
        result = json.loads(path.read_text())
        if result["dtype"] == index["dtype"]:
            runs[int(result["variant"].removeprefix("c"))] = result
    if 0 not in runs:
        print(f"no results of the rule's own tiles (kernels-tiles-c0-*.json) in {args.results}", file=sys.stderr)
        return 2
    profiled = _profiled(args.profile or [])
    tiles, notes, rows, unchecked = {}, {}, [], []
    total_before = total_after = 0.0
    for i, shape in enumerate(index["shapes"]):
        name = f"g{i}"
        base = runs[0]["kernels"].get(name)
        if base is None or not base["finite"]:
            continue
        in_model = profiled.get(f"{shape['kernel']}_kernel")
        if profiled and (in_model is None or base["gemm_ms"] > INFLATED * in_model):
            seen = f"{in_model:.3f} ms in the model" if in_model else "not in the profile"
            unchecked.append(f"{shape['key']} (rule's tile {base['gemm_ms']:.3f} ms here, {seen})")
            continue
        timed = []
        for j, tile in enumerate(shape["candidates"]):
            k = runs.get(j, {}).get("kernels", {}).get(name)
            if k is None or not k["finite"] or _rel_rms(k["sample"], base["sample"]) > REL_RMS[index["dtype"]]:
                continue
            timed.append((k["gemm_ms"], j, tile))
        ms, j, tile = min(timed)
        tiles[shape["key"]] = WebGPUTile(**tile)
        notes[shape["key"]] = {"ms": round(ms, 4), "rule_ms": round(base["gemm_ms"], 4), "runs_per_use": shape["runs"]}
        total_before += base["gemm_ms"] * shape["runs"]
        total_after += ms * shape["runs"]
        t = WebGPUTile(**tile)
        rows.append(
            f"| `{shape['key']}` | {shape['runs']} | {base['gemm_ms']:.3f} | {ms:.3f} | "
            f"{t.tile_i}x{t.tile_j}, {t.step_k} deep{' (rule)' if j == 0 else ''} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = runs[0].get("adapter", {})
    measured_on = " ".join(str(gpu.get(k, "")) for k in ("vendor", "device", "description")).split()
    about = {"measured_on": " ".join(measured_on), "models": [f"{index['model']} ({index['size']}, {index['dtype']})"]}
    _merge_into(out / TILE_TABLE_FILE, tiles, about, notes)
    print("| GEMM shape | runs per use | rule's tile (ms) | fastest (ms) | fastest tile |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    if unchecked:
        print(f"\nleft to the rule (its time here not confirmed by the model's profile): {'; '.join(unchecked)}")
    print(
        f"\nGEMM time for one use: {total_before:.1f} ms with the rule's tiles, {total_after:.1f} ms with the "
        f"table's ({len(tiles)} shapes) -> {out / TILE_TABLE_FILE}"
    )
    return 0


def _profiled(paths: list[str]) -> dict[str, float]:
    """Per-call GPU time of every kernel in the profiles of ``sd_webgpu.py`` results (``{"top": [{name,
    ms, calls}]}`` anywhere in each JSON), the fastest where a kernel appears more than once."""
    found: dict[str, float] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k in node.get("top", []) if isinstance(node.get("top"), list) else []:
                if isinstance(k, dict) and k.get("calls"):
                    per_call = k["ms"] / k["calls"]
                    found[k["name"]] = min(per_call, found.get(k["name"], per_call))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in paths:
        walk(json.loads(Path(path).read_text()))
    return found


def _merge_into(path: Path, tiles: dict[str, Any], about: dict[str, Any], notes: dict[str, Any]) -> None:
    """Write the table at ``path`` with ``tiles``, keeping the entries of other shapes it already holds
    (another dtype's, another model's) and naming every model measured."""
    from mlcweb_passes.webgpu.gemm import read_tile_table, write_tile_table

    if path.exists():
        old = json.loads(path.read_text())
        kept = {k: v for k, v in read_tile_table(path).items() if k not in tiles}
        notes = {**{k: {n: v for n, v in e.items() if n != "tile"} for k, e in old["tiles"].items()}, **notes}
        tiles = {**kept, **tiles}
        if old.get("measured_on") not in (None, about["measured_on"]):
            about["measured_on"] = f"{old['measured_on']}; {about['measured_on']}"
        about["models"] = sorted({*old.get("models", []), *about["models"]})
    write_tile_table(path, tiles, about, {k: notes[k] for k in tiles})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="one candidate library per candidate index")
    b.add_argument("--out", required=True)
    b.add_argument("--model", default="stable-diffusion")
    b.add_argument("--size", default="full")
    b.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    b.add_argument("--max-shapes", type=int, default=0, help="only the N heaviest shapes")
    b.add_argument("--prior", help="a first round's results (with its tiles-index.json): re-time its winners")
    b.add_argument("--top", type=int, default=3, help="with --prior: the fastest N candidates besides the rule's")
    p = sub.add_parser("pick", help="the fastest tile per shape into a tile table")
    p.add_argument("results")
    p.add_argument("--kernels", required=True, help="build's --out (its tiles-index.json)")
    p.add_argument("--out", required=True, help="the directory the table is written into")
    p.add_argument(
        "--profile",
        action="append",
        help="sd_webgpu.py results of a build with the rule's tiles: keep only shapes whose rule's tile timed "
        "here as in the model (repeatable)",
    )
    args = parser.parse_args(argv)
    return {"build": build, "pick": pick}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

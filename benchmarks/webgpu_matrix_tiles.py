#!/usr/bin/env python3
"""Tune the subgroup-matrix GEMM tiles from whole-model runs: builds that differ only in their matrix
tiles (``sd_webgpu.py build --matrix-tiles ... [--matrix-shared BYTES]``) timed in one machine session
by ``sd_webgpu.py run`` (``-matrix`` runs, with ``--profile-top`` covering every kernel); for each GEMM
size, the tile whose kernels took the least GPU time is written to a matrix tile table
(``webgpu_matrix_tiles.json``, :mod:`mlcweb_passes.webgpu.matrix_tiles`) that builds apply::

    python benchmarks/sd_webgpu.py build --out .dev/builds --name sd15w --dtypes float16
    python benchmarks/sd_webgpu.py build --out .dev/builds --name sd15y --dtypes float16 \\
        --matrix-tiles 64x128x32,128x160x32,64x64x32,64x32x32
    python benchmarks/sd_webgpu.py pack --builds .dev/builds --out .dev/pk
    # on the GPU machine
    python3 benchmarks/sd_webgpu.py run --carry .dev/pk --results $OUT --no-subgroups --profile-top 200
    # here
    python benchmarks/webgpu_matrix_tiles.py pick RESULTS_DIR --builds .dev/builds --baseline sd15w \\
        --out mlcweb/databases/webgpu

The kernels of one build are profiled in the same model call, so each GEMM's tile is timed where it runs
(caches, neighbours, clocks); the baseline build is what builds do without a table, and a tile replaces
its choice only where it is faster by more than ``--margin``. Tiles that need more workgroup memory than
``--max-shared`` (default: the 32 KiB every build's target declares) are left out, so the table applies
to the builds the page runs on any adapter; with more (``--max-shared 49152``), the table is written as
the one for the builds' second table of matrix kernels, for adapters granting that much
(``webgpu_matrix_tiles_49152.json``, ``PipelineOptions.webgpu_matrix_larger``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_SIZES = re.compile(r"^// mlcweb: (\d+) x (\d+) x (\d+) x (\d+) on", re.M)
_LAYOUT = re.compile(r"^// (\d+)x(\d+) tiles (\d+) deep on (\d+)x(\d+) subgroups", re.M)
_SPEC = re.compile(r"^// tile (\S+)$", re.M)


def kernel_tiles(build_dir: Path, granted: int | None = None) -> dict[str, tuple[str, Any]]:
    """Each subgroup-matrix GEMM kernel of a build (``sd_webgpu.py build`` output): its GEMM key and tile,
    read from the comments the generator writes, in the table the page runs on an adapter granting
    ``granted`` bytes of workgroup memory (the build's own table, or a larger one in ``matrix.larger``,
    as ``mlcweb.js chooseMatrix`` takes it; None: the own table). Kernels written before the ``// tile``
    comment existed get their epilogue's turns back from the build's workgroup memory (the rule's choice:
    one turn where it fits, else two)."""
    sys.path.insert(0, str(ROOT))
    from mlcweb_passes.webgpu.matrix_gemm import MatrixConfig, MatrixTile, gemm_key

    manifest = json.loads((build_dir / "manifest.json").read_text())
    matrix = manifest.get("webgpu", {}).get("matrix")
    if not matrix:
        raise SystemExit(f"webgpu_matrix_tiles: {build_dir} has no subgroup-matrix kernels")
    if granted is not None:
        fitting = [t for t in [matrix, *matrix.get("larger", [])] if t["workgroup_storage_bytes"] <= granted]
        matrix = max(fitting, key=lambda t: t["workgroup_storage_bytes"], default=matrix)
    limit = 32768 if matrix["workgroup_storage_bytes"] <= 32768 else 49152
    found: dict[str, tuple[str, Any]] = {}
    for name, kernel in json.loads((build_dir / matrix["kernels"]).read_text()).items():
        sizes, layout = _SIZES.search(kernel["code"]), _LAYOUT.search(kernel["code"])
        if sizes is None or layout is None:
            continue  # an attention kernel
        spec = _SPEC.search(kernel["code"])
        if spec is not None:
            tile = MatrixTile.parse(spec.group(1))
        else:
            rows, cols, depth, gr, gc = (int(v) for v in layout.groups())
            tile = MatrixTile(rows, cols, depth, (gr, gc))
            if tile.shared_bytes(MatrixConfig()) > limit:
                tile = MatrixTile(rows, cols, depth, (gr, gc), 2)
        found[name] = (gemm_key(*(int(v) for v in sizes.groups())), tile)
    return found


def _runs(results: list[Path]) -> list[tuple[str, dict[str, Any]]]:
    """(build name, run) for every ``-matrix`` run of ``sd_webgpu.py run`` in these folders."""
    runs = []
    for folder in results:
        for path in sorted(folder.glob("webgpu-*-matrix.json")):
            build = path.stem.removeprefix("webgpu-").removesuffix("-matrix").removesuffix("-subgroups")
            runs.append((build, json.loads(path.read_text())))
    if not runs:
        raise SystemExit(f"webgpu_matrix_tiles: no -matrix runs in {', '.join(map(str, results))}")
    return runs


def measure(
    runs: list[tuple[str, dict[str, Any]]], builds: Path
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, Any]]]:
    """GPU ms a model call spends in each GEMM key's kernels, by the tile they ran on (one value per run),
    and each build's tile per key."""
    times: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    chosen: dict[str, dict[str, Any]] = {}
    for build, run in runs:
        granted = ((run.get("adapter") or {}).get("limits") or {}).get("maxComputeWorkgroupStorageSize")
        tiles = kernel_tiles(builds / build, granted)
        chosen[build.rsplit("-", 1)[0]] = {key: tile for key, tile in tiles.values()}
        per_key: dict[tuple[str, str], float] = defaultdict(float)
        for profile in (run.get("profile") or {}).values():
            for kernel in profile["top"]:
                if kernel["name"] in tiles:
                    key, tile = tiles[kernel["name"]]
                    per_key[key, tile.spec()] += kernel["ms"]
        for (key, spec), ms in per_key.items():
            times[key][spec].append(ms)
    return times, chosen


def pick(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    from mlcweb_passes.webgpu.matrix_gemm import MatrixConfig, MatrixTile
    from mlcweb_passes.webgpu.matrix_tiles import matrix_tiles_file, write_matrix_tiles

    runs = _runs([Path(r) for r in args.results])
    times, chosen = measure(runs, Path(args.builds))
    if args.baseline not in chosen:
        raise SystemExit(f"webgpu_matrix_tiles: no -matrix run of the baseline {args.baseline!r} ({', '.join(chosen)})")
    rule = chosen[args.baseline]
    tiles: dict[str, Any] = {}
    notes: dict[str, dict[str, Any]] = {}
    for key, by_tile in sorted(times.items()):
        if key not in rule:
            continue
        median = {spec: sorted(v)[len(v) // 2] for spec, v in by_tile.items()}
        allowed = {
            s: ms for s, ms in median.items() if MatrixTile.parse(s).shared_bytes(MatrixConfig()) <= args.max_shared
        }
        base = rule[key].spec()
        if base not in median:
            continue
        best = min(allowed, key=lambda s: allowed[s])
        tile = best if allowed[best] < (1 - args.margin) * median[base] else base
        tiles[key] = MatrixTile.parse(tile)
        notes[key] = {"ms": round(median[tile], 4), "rule": base, "rule_ms": round(median[base], 4)}
        notes[key]["measured"] = {s: round(ms, 4) for s, ms in sorted(median.items())}
    out = Path(args.out)
    # in a database folder: the build's own table, or the one for adapters granting --max-shared bytes
    path = out / matrix_tiles_file(None if args.max_shared <= 32768 else args.max_shared) if out.is_dir() else out
    adapter = next((r["adapter"] for _, r in runs if r.get("adapter")), {})
    about = {
        "measured_on": " ".join(str(adapter.get(k, "")) for k in ("vendor", "device", "description")).strip(),
        "models": ["stable-diffusion (full, float16)"],
        "how": "benchmarks/webgpu_matrix_tiles.py pick: GPU time of each GEMM size's kernels in whole-model calls",
        "max_shared": args.max_shared,
    }
    write_matrix_tiles(path, tiles, about, notes)
    changed = {k: t for k, t in tiles.items() if t != rule[k]}
    saved = sum(notes[k]["rule_ms"] - notes[k]["ms"] for k in changed)
    print(f"{path}: {len(tiles)} GEMM sizes, {len(changed)} off the rule's tile ({saved:.2f} ms of GPU time a call)")
    for key in sorted(changed, key=lambda k: notes[k]["ms"] - notes[k]["rule_ms"]):
        n = notes[key]
        print(f"  {key}: {n['rule']} {n['rule_ms']:.3f} ms -> {tiles[key].spec()} {n['ms']:.3f} ms")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pick", help="the fastest tile per GEMM size into a matrix tile table")
    p.add_argument("results", nargs="+", help="sd_webgpu.py run result folders (one machine session)")
    p.add_argument("--builds", required=True, help="the folder of the builds those runs timed")
    p.add_argument("--baseline", required=True, help="the build made with the default tiles (its --name)")
    p.add_argument("--out", required=True, help="a database folder or a file to write")
    p.add_argument("--max-shared", type=int, default=32768, help="leave out tiles needing more workgroup memory")
    p.add_argument("--margin", type=float, default=0.03, help="how much faster than the rule's tile a tile must be")
    args = parser.parse_args(argv)
    return pick(args)


if __name__ == "__main__":
    sys.exit(main())

"""benchmarks/webgpu_tiles.py's pick: per GEMM shape, the fastest candidate whose output matches the rule's
own tile's, written as a tile table builds read; a faster candidate that computes something else loses."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import webgpu_tiles

from mlcweb_passes.webgpu.gemm import LARGE, MEDIUM, SMALL, TILE_TABLE_FILE, WIDE, GemmShape, read_tile_table

SHAPES = ["16bit 1x8192x320x5760 k/k", "16bit 2x4096x2560x320 k/k"]
CANDIDATES = [[MEDIUM, WIDE, SMALL], [LARGE, MEDIUM]]
# ms per candidate index; None: not in that library
TIMES = [[1.0, 0.7, 0.9], [0.5, 0.6]]


def _write(kernels: Path, results: Path, wrong: tuple[int, int]) -> None:
    index = {
        "model": "stable-diffusion",
        "size": "full",
        "dtype": "float16",
        "shapes": [
            {
                "key": key,
                "flops": 1,
                "kernel": f"k{i}",
                "runs": 20,
                "kernels": [f"k{i}"],
                "candidates": [dataclasses.asdict(t) for t in CANDIDATES[i]],
            }
            for i, key in enumerate(SHAPES)
        ],
    }
    kernels.mkdir()
    (kernels / "tiles-index.json").write_text(json.dumps(index))
    results.mkdir()
    for j in range(3):
        out = {}
        for i in range(len(SHAPES)):
            if j < len(TIMES[i]):
                sample = [1.0, 2.0, 3.0] if (i, j) != wrong else [1.0, 2.0, 4.0]
                out[f"g{i}"] = {"gemm_ms": TIMES[i][j], "finite": True, "sample": sample}
        result = {"variant": f"c{j}", "dtype": "float16", "adapter": {"vendor": "nvidia"}, "kernels": out}
        (results / f"kernels-tiles-c{j}-float16.json").write_text(json.dumps(result))


def test_pick_takes_the_fastest_tile_that_computes_the_same(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "k", tmp_path / "r", wrong=(0, 1))  # shape 0's fastest candidate is wrong
    args = ["pick", str(tmp_path / "r"), "--kernels", str(tmp_path / "k"), "--out", str(tmp_path / "db")]
    assert webgpu_tiles.main(args) == 0
    table = read_tile_table(tmp_path / "db" / TILE_TABLE_FILE)
    assert table == {SHAPES[0]: SMALL, SHAPES[1]: LARGE}  # 0.9 ms (not the wrong 0.7), the rule's 0.5 ms
    notes = json.loads((tmp_path / "db" / TILE_TABLE_FILE).read_text())["tiles"][SHAPES[0]]
    assert notes["ms"] == 0.9 and notes["rule_ms"] == 1.0
    assert "30.0 ms with the rule's tiles, 28.0 ms with the table's" in capsys.readouterr().out


def test_pick_needs_the_rules_own_tiles(tmp_path: Path) -> None:
    _write(tmp_path / "k", tmp_path / "r", wrong=(-1, -1))
    (tmp_path / "r" / "kernels-tiles-c0-float16.json").unlink()
    assert (
        webgpu_tiles.main(["pick", str(tmp_path / "r"), "--kernels", str(tmp_path / "k"), "--out", str(tmp_path)]) == 2
    )


def test_pick_with_a_profile_leaves_inflated_and_unprofiled_shapes_to_the_rule(tmp_path: Path) -> None:
    """A rule's tile timed 1.0 ms here but 0.2 ms in the model's profile was timed after an idle GPU:
    its shape keeps the rule's tile; a shape missing from the profile too."""
    _write(tmp_path / "k", tmp_path / "r", wrong=(-1, -1))
    profile = {"profile": {"unet": {"top": [{"name": "k0_kernel", "ms": 0.4, "calls": 2}]}}}
    (tmp_path / "p.json").write_text(json.dumps(profile))
    args = ["pick", str(tmp_path / "r"), "--kernels", str(tmp_path / "k"), "--out", str(tmp_path / "db")]
    assert webgpu_tiles.main([*args, "--profile", str(tmp_path / "p.json")]) == 0
    assert read_tile_table(tmp_path / "db" / TILE_TABLE_FILE) == {}
    profile["profile"]["unet"]["top"] += [
        {"name": "k0_kernel", "ms": 0.95, "calls": 1},
        {"name": "k1_kernel", "ms": 0.5, "calls": 1},
    ]
    profile["profile"]["unet"]["top"][0]["ms"] = 2.0  # now 1.0 a call: confirmed
    (tmp_path / "p.json").write_text(json.dumps(profile))
    assert webgpu_tiles.main([*args, "--profile", str(tmp_path / "p.json")]) == 0
    assert read_tile_table(tmp_path / "db" / TILE_TABLE_FILE) == {SHAPES[0]: WIDE, SHAPES[1]: LARGE}


def test_a_second_round_retimes_the_first_rounds_winners(tmp_path: Path) -> None:
    """--prior: shapes where a candidate beat the rule's tile, with the rule's tile and the fastest
    others; a shape the rule's tile won drops out."""
    _write(tmp_path / "k", tmp_path / "r", wrong=(-1, -1))
    (tmp_path / "r" / "tiles-index.json").write_text((tmp_path / "k" / "tiles-index.json").read_text())
    shapes = [webgpu_tiles.Shape(_gemm(key), f"k{i}") for i, key in enumerate(SHAPES)]
    candidates = {key: list(CANDIDATES[i]) for i, key in enumerate(SHAPES)}
    kept, finalists = webgpu_tiles._finalists(shapes, candidates, tmp_path / "r", top=1)
    assert [s.key for s in kept] == [SHAPES[0]]
    assert finalists == {SHAPES[0]: [MEDIUM, WIDE]}


def _gemm(key: str) -> GemmShape:
    bits, dims, axes = key.split(" ")
    b, m, n, k = (int(x) for x in dims.split("x"))
    a_axis, b_axis = axes.split("/")
    return GemmShape(int(bits.removesuffix("bit")), b, m, n, k, (a_axis, b_axis))

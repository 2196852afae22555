"""webgpu/matrix_tiles: measured subgroup-matrix tiles by GEMM size, taken before the rule where they fit.

Before: every GEMM on the rule's tile (a 2 x 16 x 8 x 64 -> 128 convolution, 256 x 128 x 576, on the
first tile of ``TILE_ORDER``, 64x128). After: a table entry for that size puts it on 64x64 tiles on 2x2
subgroups; an entry that does not divide the GEMM or needs more workgroup memory than the target has is
ignored, and the rule decides.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp
from mlcweb_passes.gemm_analysis import UnsupportedGemmError
from mlcweb_passes.webgpu.matrix_gemm import (
    PLANS_ATTR,
    TILE_ORDER,
    MatrixConfig,
    MatrixTile,
    choose_matrix_tile,
    plans_attr,
)
from mlcweb_passes.webgpu.matrix_tiles import (
    MATRIX_TILES_FILE,
    matrix_tiles_file,
    read_matrix_tiles,
    write_matrix_tiles,
)

CONFIG = MatrixConfig()


def test_table_round_trip_and_errors(tmp_path: Path) -> None:
    """A table written is read back tile for tile, with what was measured beside each; anything else is a
    ValueError naming the file (and the entry)."""
    tiles = {"1x8192x320x2880": MatrixTile(128, 160, 32), "2x128x1280x1280": MatrixTile(64, 128, 64, rounds=2)}
    path = tmp_path / MATRIX_TILES_FILE
    write_matrix_tiles(path, tiles, {"measured_on": "test"}, {"1x8192x320x2880": {"ms": 1.29, "rule_ms": 1.67}})
    assert read_matrix_tiles(path) == tiles
    data = json.loads(path.read_text())
    assert data["tiles"]["1x8192x320x2880"] == {"tile": "128x160x32", "ms": 1.29, "rule_ms": 1.67}
    assert [p.name for p in tmp_path.iterdir()] == [MATRIX_TILES_FILE]  # no temporary file left
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "mlcweb-webgpu-matrix-tiles/1", "tiles": {"8192x320": {"tile": "64x64x32"}}}))
    with pytest.raises(ValueError, match=r"bad\.json: entry '8192x320'"):
        read_matrix_tiles(bad)
    bad.write_text(json.dumps({"format": "mlcweb-webgpu-matrix-tiles/1", "tiles": {"1x2x3x4": {"tile": "64"}}}))
    with pytest.raises(ValueError, match="ROWSxCOLSxDEPTH"):
        read_matrix_tiles(bad)
    bad.write_text("{}")
    with pytest.raises(ValueError, match="is not a WebGPU matrix tile table"):
        read_matrix_tiles(bad)
    with pytest.raises(ValueError, match="cannot read"):
        read_matrix_tiles(tmp_path / "missing.json")


def test_measured_tile_first_where_it_fits() -> None:
    """The table's tile for the GEMM's size, whatever the rule would take; the rule where the entry does
    not divide the GEMM, needs more workgroup memory than given, or is for another size."""
    tuned = {"1x8192x320x2880": MatrixTile(128, 160, 32), "1x8192x320x640": MatrixTile(128, 128, 64)}
    assert choose_matrix_tile(8192, 320, 2880, CONFIG, 32768, wave=128) == MatrixTile(64, 64, 32)
    assert choose_matrix_tile(8192, 320, 2880, CONFIG, 32768, wave=128, tuned=tuned) == MatrixTile(128, 160, 32)
    assert choose_matrix_tile(8192, 320, 2880, CONFIG, 16384, wave=128, tuned=tuned) == MatrixTile(64, 32, 32)
    assert choose_matrix_tile(8192, 320, 640, CONFIG, 65536, wave=128, tuned=tuned) == MatrixTile(64, 64, 32)
    with pytest.raises(UnsupportedGemmError, match="no tile divides 2 x 320"):  # 64-row tiles for 2 rows
        choose_matrix_tile(2, 320, 2880, CONFIG, 32768, wave=128, tuned={"1x2x320x2880": MatrixTile(64, 64, 32)})


@I.ir_module
class Conv:
    @R.function
    def conv(x: R.Tensor((2, 16, 8, 64), "float16"), w: R.Tensor((128, 3, 3, 64), "float16")) -> R.Tensor(
        (2, 16, 8, 128), "float16"
    ):
        with R.dataflow():
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1], data_layout="NHWC", kernel_layout="OHWI", out_dtype="float32")
            out = R.astype(y, "float16")
            R.output(out)
        return out


def _empty_database(path: Path) -> None:
    """A MetaSchedule database directory with no records, for the tile tables beside it."""
    for name in ("database_workload.json", "database_tuning_record.json"):
        (path / name).write_text("")


def _planned_tile(options: mp.PipelineOptions, attr: str = PLANS_ATTR) -> dict[str, object]:
    from webgpu_node import WEBGPU

    with WEBGPU:
        lowered = mp.pipeline(WEBGPU, options)(Conv)
    (plan,) = (json.loads(str(v)) for v in lowered.attrs[attr].values())
    assert (plan["batch"], plan["m"], plan["n"], plan["k"]) == (1, 256, 128, 576)
    return dict(plan["tile"])


def test_pipeline_takes_the_database_directorys_table(tmp_path: Path) -> None:
    """``PipelineOptions.database`` as a directory holding ``webgpu_matrix_tiles.json`` (as the shipped
    webgpu database does) gives the plans their tiles; ``webgpu_matrix_tuned`` gives a table directly."""
    base = {"dtype": "float16", "conv_layout": "NHWC", "webgpu_matrix": CONFIG, "split_k": False}
    rule = _planned_tile(mp.PipelineOptions(**base))  # type: ignore[arg-type]
    assert (rule["rows"], rule["cols"]) == (TILE_ORDER[0].rows, TILE_ORDER[0].cols)
    tile = MatrixTile(64, 64, 32, (2, 2))
    _empty_database(tmp_path)
    write_matrix_tiles(tmp_path / MATRIX_TILES_FILE, {"1x256x128x576": tile})
    from_dir = _planned_tile(mp.PipelineOptions(**base, database=str(tmp_path)))  # type: ignore[arg-type]
    assert (from_dir["rows"], from_dir["cols"], from_dir["grid"]) == (64, 64, [2, 2])
    given = _planned_tile(mp.PipelineOptions(**base, webgpu_matrix_tuned={"1x256x128x576": MatrixTile(64, 32, 32)}))  # type: ignore[arg-type]
    assert (given["rows"], given["cols"]) == (64, 32)


def test_larger_tables_are_planned_with_their_own_tiles(tmp_path: Path) -> None:
    """``webgpu_matrix_larger`` (48 KiB by default) plans the GEMMs again within that much workgroup memory
    (``plans_attr(49152)``), with the database directory's table for the size: the 44 KiB 128x128 tile
    there, the rule's 64x128 tile in the build's own table."""
    _empty_database(tmp_path)
    write_matrix_tiles(tmp_path / matrix_tiles_file(49152), {"1x256x128x576": MatrixTile(128, 128, 64)})
    base = {"dtype": "float16", "conv_layout": "NHWC", "webgpu_matrix": CONFIG, "split_k": False}
    options = mp.PipelineOptions(**base, database=str(tmp_path))  # type: ignore[arg-type]
    larger = _planned_tile(options, plans_attr(49152))
    assert (larger["rows"], larger["cols"], larger["depth"]) == (128, 128, 64)
    assert _planned_tile(options)["rows"] == 64
    with pytest.raises(KeyError):
        _planned_tile(mp.PipelineOptions(**base, database=str(tmp_path), webgpu_matrix_larger=()), plans_attr(49152))  # type: ignore[arg-type]

"""Tuned tiles for the subgroup-matrix GEMMs: a table of measured tiles by GEMM size.

:func:`~mlcweb_passes.webgpu.matrix_gemm.choose_matrix_tile`'s rule (the first tile of an order that
divides the GEMM, deeper on small grids) is one choice for every GEMM; timed in a model, the best tile
differs from GEMM to GEMM (wider tiles for a 64x64-latent convolution with 320 channels and a deep
reduction, narrower ones for the same channels over 154 text tokens). A tile table records, for each
GEMM size (:func:`~mlcweb_passes.webgpu.matrix_gemm.gemm_key`: batch x rows x columns x reduction), the
tile that was fastest where it was measured; ``PlanMatrixGemms(tuned=...)`` takes it first wherever it
divides the GEMM and fits the target's workgroup memory, and the rule decides the rest.

A table lives in a database directory as :data:`MATRIX_TILES_FILE` (beside the MetaSchedule records and
the portable GEMMs' :data:`~mlcweb_passes.webgpu.gemm.TILE_TABLE_FILE`), so the pipeline finds it where
``PipelineOptions.database`` is a directory; ``PipelineOptions.webgpu_matrix_tuned`` gives one directly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from .gemm import write_table
from .matrix_gemm import MatrixTile

__all__ = ["MATRIX_TILES_FILE", "MATRIX_TILES_FORMAT", "matrix_tiles_file", "read_matrix_tiles", "write_matrix_tiles"]

MATRIX_TILES_FILE = "webgpu_matrix_tiles.json"  # a matrix tile table's name inside a database directory
MATRIX_TILES_FORMAT = "mlcweb-webgpu-matrix-tiles/1"


def matrix_tiles_file(larger: int | None = None) -> str:
    """The table's file name in a database directory: :data:`MATRIX_TILES_FILE` for the build's own
    kernels, ``webgpu_matrix_tiles_<bytes>.json`` for those planned within ``larger`` bytes."""
    return MATRIX_TILES_FILE if larger is None else f"webgpu_matrix_tiles_{larger}.json"


def read_matrix_tiles(path: str | os.PathLike[str]) -> dict[str, MatrixTile]:
    """The tiles of a table file (:func:`write_matrix_tiles`) by GEMM key; a ``ValueError`` naming the
    file and the entry for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the WebGPU matrix tile table {os.fspath(path)}: {err}") from err
    known = isinstance(data, dict) and data.get("format") == MATRIX_TILES_FORMAT
    if not known or not isinstance(data.get("tiles"), dict):
        raise ValueError(f"{os.fspath(path)} is not a WebGPU matrix tile table (format {MATRIX_TILES_FORMAT!r})")
    tiles = {}
    for key, entry in data["tiles"].items():
        spec = entry.get("tile") if isinstance(entry, dict) else None
        sizes = key.split("x")
        if not isinstance(spec, str) or len(sizes) != 4 or not all(s.isdigit() for s in sizes):
            raise ValueError(f"{os.fspath(path)}: entry {key!r} is not BxMxNxK with a tile spec")
        try:
            tiles[key] = MatrixTile.parse(spec)
        except ValueError as err:
            raise ValueError(f"{os.fspath(path)}: entry {key!r}: {err}") from err
    return tiles


def write_matrix_tiles(
    path: str | os.PathLike[str],
    tiles: Mapping[str, MatrixTile],
    about: Mapping[str, object] | None = None,
    notes: Mapping[str, Mapping[str, object]] | None = None,
) -> None:
    """Write ``tiles`` (by GEMM key) as a table: ``about`` says where they were measured, ``notes[key]``
    what was measured for a GEMM. Written to a temporary file and renamed."""
    entries = {key: {"tile": tiles[key].spec(), **dict((notes or {}).get(key, {}))} for key in sorted(tiles)}
    write_table(path, {"format": MATRIX_TILES_FORMAT, **dict(about or {}), "tiles": entries})

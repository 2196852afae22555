"""A WebGPU schedule rule for GEMMs: matmuls and convolutions (as implicit GEMMs), tiled for large GPUs.

dlight's ``Matmul`` rule gives a WebGPU GEMM 32x32 outputs per workgroup of 64 threads, each thread 4x4
outputs in a contiguous block, 8-deep reduction steps through workgroup memory, and copies its tiles in
the buffers' index order. On a desktop GPU that leaves most of the chip idle between barriers, and in
SD's NCHW convolutions the copy's neighbouring threads read elements a whole image plane apart.

:class:`WebGPUMatmul` schedules ``C[S, I, J] += A[S, I, K] * B[S, J, K]`` (after dlight's normalisation
and padding to whole tiles) as follows:

- a workgroup of ``threads_y x threads_x`` threads computes a ``tile_i x tile_j`` output tile; each
  thread holds ``micro_i x micro_j`` accumulators, spread over the tile in ``virtual_i x virtual_j``
  strided groups of ``micro / virtual`` adjacent outputs (virtual threads). The tiles take one output a
  group (rows and columns ``threads`` apart), so neighbouring threads read neighbouring rows of
  workgroup memory, each in its own banks; pairs of adjacent outputs made every read of the ``B`` tile a
  2-way bank conflict (rows 2 apart on a 40- or 80-byte row pitch);
- the reduction walks ``step_k`` at a time: both operands' tiles are copied into workgroup memory by all
  threads, neighbouring threads taking neighbouring elements along the axis that is contiguous in
  global memory (the output pixels of an NCHW convolution's input, the reduction of a ``[N, K]``
  weight or of an NHWC convolution's operands, the output columns of a ``[K, N]`` one), so each
  subgroup's loads coalesce; where that axis is the reduction, each thread copies ``vector_k`` (4)
  elements at once;
- the tiles' rows are padded by ``vector_k`` elements, and each thread reads its rows and columns
  ``vector_k`` reduction steps at a time into registers (one ``vec4`` workgroup read feeding
  ``4 x micro_j`` multiply-adds) before multiplying; the padding keeps those reads aligned and spreads a
  subgroup's rows over the banks. ``vector_k=1`` gives the scalar schedule (one-element padding);
- the epilogue fused after the GEMM (bias, activation, casts, residual additions) runs on the
  accumulators in registers before the store;
- with ``prefetch``, each thread loads its share of the next reduction step's tiles from global memory
  into registers before this step's multiply-adds (a two-stage software pipeline over the reduction), so
  the loads' latency overlaps arithmetic instead of stalling at the barrier; the copies then give each
  thread one adjacent run of its tile (whole sectors per subgroup still), which its registers hold with
  constant indices. Off by default: measured slower on an H100 (benchmarks/README.md); kept for GPUs
  that hide less load latency with other workgroups.

The tile comes from :func:`choose_webgpu_tile`: 128x128 (8x8 a thread) where the GEMM makes enough
workgroups to fill a large GPU, 64x64 (4x4) otherwise, 32x64 for the narrowest. With float16 operands
its reduction steps are 32 deep (:data:`DEEP_STEP_K`: half the barriers and loop overhead of 16) where
both operand tiles still fit the target's workgroup memory (18 KiB at 128x128) and the reduction pads to
no more than with 16 (attention's 40-wide heads keep 16); float32 tiles keep 16-deep steps, which
measured faster for them. WebGPU exposes no multiprocessor count, so "enough" is a fixed workgroup count
(:data:`FILL_WORKGROUPS`, sized for desktop GPUs; a smaller GPU is full sooner and loses nothing).

A tile table (``tiles``: :func:`read_tile_table` of a ``webgpu_gemm_tiles.json``) overrides that choice
per GEMM shape: its keys are :class:`GemmShape` keys (operand width, batch x rows x columns x reduction,
which axis each operand walks contiguously), its tiles measured fastest for that shape on a GPU by
``benchmarks/webgpu_tiles.py`` among :func:`tile_candidates`. A shape the table lacks, or a tile that
does not fit the target's limits, gets the rule's own choice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.gpu.matmul import (
    auto_inline_consumer_chain,
    auto_inline_producers,
    get_index_map,
    get_reduction_blocks,
)
from tvm.target import Target

from .._tir import normalise_gemm, uses_var

__all__ = [
    "DEEP_STEP_K",
    "FILL_WORKGROUPS",
    "TILE_TABLE_FILE",
    "GemmShape",
    "WebGPUMatmul",
    "WebGPUTile",
    "choose_webgpu_tile",
    "gemm_shape",
    "read_tile_table",
    "tile_candidates",
    "write_tile_table",
]

log = logging.getLogger(__name__)

FILL_WORKGROUPS = 256  # workgroups of large tiles that keep a desktop GPU's compute units busy
DEEP_STEP_K = 32  # reduction depth a step where the workgroup memory holds it: half the barriers
TILE_TABLE_FILE = "webgpu_gemm_tiles.json"  # a tile table's name inside a database directory
TILE_TABLE_FORMAT = "mlcweb-webgpu-gemm-tiles/1"


@dataclass(frozen=True)
class WebGPUTile:
    """One workgroup's share of a GEMM (see the module docstring)."""

    threads_i: int = 16
    threads_j: int = 16
    micro_i: int = 4
    micro_j: int = 4
    virtual_i: int = 2
    virtual_j: int = 2
    step_k: int = 16
    vector_k: int = 4
    prefetch: bool = False

    @property
    def tile_i(self) -> int:
        return self.threads_i * self.micro_i

    @property
    def tile_j(self) -> int:
        return self.threads_j * self.micro_j

    @property
    def threads(self) -> int:
        return self.threads_i * self.threads_j

    @property
    def row_pad(self) -> int:
        """Elements between workgroup-memory rows: one for scalar reads, ``vector_k`` for vector ones."""
        return max(1, self.vector_k)

    def shared_bytes(self, dtype_bytes: int) -> int:
        """Workgroup memory of both operand tiles, rows padded by :attr:`row_pad`."""
        return (self.tile_i + self.tile_j) * (self.step_k + self.row_pad) * dtype_bytes

    def fits(self, max_threads: int, max_shared: int, dtype_bytes: int) -> bool:
        """Whether the tile's workgroup and its operand tiles fit the target's limits."""
        return self.threads <= max_threads and self.shared_bytes(dtype_bytes) <= max_shared

    def __post_init__(self) -> None:
        sizes = (self.threads_i, self.threads_j, self.micro_i, self.micro_j, self.virtual_i, self.virtual_j)
        if min(*sizes, self.step_k, self.vector_k) < 1:
            raise ValueError(f"a WebGPU tile's sizes are positive: {self}")
        if self.micro_i % self.virtual_i or self.micro_j % self.virtual_j or self.step_k % self.vector_k:
            raise ValueError(
                f"a WebGPU tile's micro tile splits into its virtual threads, its step into vectors: {self}"
            )


LARGE = WebGPUTile(16, 16, 8, 8, 8, 8, 16)  # 128 x 128
WIDE = WebGPUTile(16, 16, 8, 4, 8, 4, 16)  # 128 x 64 (a tuning candidate)
TALL = WebGPUTile(16, 16, 4, 8, 4, 8, 16)  # 64 x 128 (a tuning candidate)
MEDIUM = WebGPUTile(16, 16, 4, 4, 4, 4, 16)  # 64 x 64
SMALL = WebGPUTile(8, 16, 4, 4, 4, 4, 16)  # 32 x 64


@dataclass(frozen=True)
class GemmShape:
    """What a GEMM's tile depends on, after normalisation to ``C[S, I, J] += A[S, I, K] * B[S, J, K]``:
    the operands' width in bits, the extents, and which axis each operand walks contiguously in global
    memory ("k": the reduction, "mn": its rows or columns)."""

    bits: int
    batch: int
    m: int
    n: int
    k: int
    contiguous: tuple[str, str]

    @property
    def key(self) -> str:
        """The tile table's key, e.g. ``16bit 1x8192x320x5760 k/k``."""
        return f"{self.bits}bit {self.batch}x{self.m}x{self.n}x{self.k} {'/'.join(self.contiguous)}"

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.n * self.k


def choose_webgpu_tile(
    batch: int,
    m: int,
    n: int,
    max_threads: int = 256,
    max_shared: int = 16384,
    dtype_bytes: int = 4,
    k: int | None = None,
) -> WebGPUTile:
    """The largest tile whose workgroups still fill a large GPU (:data:`FILL_WORKGROUPS`) and fit the
    target's limits (threads per workgroup, workgroup memory for operands of ``dtype_bytes``); for
    float16 operands with :data:`DEEP_STEP_K`-deep reduction steps where they fit too and a reduction of
    ``k`` pads to no more than with the tile's own steps (attention's 40-wide heads keep 16)."""
    for tile in (LARGE, MEDIUM):
        blocks = batch * -(-m // tile.tile_i) * -(-n // tile.tile_j)
        if tile.fits(max_threads, max_shared, dtype_bytes) and blocks >= FILL_WORKGROUPS:
            return _deeper(tile, max_shared, dtype_bytes, k)
    tile = MEDIUM if MEDIUM.threads <= max_threads and m >= 64 else SMALL
    return _deeper(tile, max_shared, dtype_bytes, k)


def _deeper(tile: WebGPUTile, max_shared: int, dtype_bytes: int, k: int | None) -> WebGPUTile:
    # float16 operands only: 32-deep steps made float32's 64x64 tiles slower (benchmarks/README.md)
    if k is None or tile.step_k >= DEEP_STEP_K or dtype_bytes > 2:
        return tile
    deep = _deep(tile, k)
    return deep if deep is not None and deep.shared_bytes(dtype_bytes) <= max_shared else tile


def _deep(tile: WebGPUTile, k: int) -> WebGPUTile | None:
    """``tile`` with :data:`DEEP_STEP_K`-deep steps, or None where they would pad ``k`` further."""
    same_padding = -(-k // DEEP_STEP_K) * DEEP_STEP_K == -(-k // tile.step_k) * tile.step_k
    return dataclasses.replace(tile, step_k=DEEP_STEP_K) if same_padding else None


def tile_candidates(shape: GemmShape, max_threads: int = 256, max_shared: int = 16384) -> list[WebGPUTile]:
    """The tiles a tuner measures for ``shape``: the rule's own choice first, then 128x128, 128x64,
    64x128, 64x64 and 32x64 tiles with 16- and 32-deep steps (any operand width), each fitting the
    limits, padding ``k`` no further than 16-deep steps, and at least half of it inside the GEMM."""
    bytes_ = shape.bits // 8
    chosen = choose_webgpu_tile(shape.batch, shape.m, shape.n, max_threads, max_shared, bytes_, shape.k)
    found = [chosen]
    for base in (LARGE, WIDE, TALL, MEDIUM, SMALL):
        for tile in (base, _deep(base, shape.k)):
            if tile is None or tile in found or not tile.fits(max_threads, max_shared, bytes_):
                continue
            if tile.tile_i >= 2 * shape.m or tile.tile_j >= 2 * shape.n:
                continue
            found.append(tile)
    return found


def read_tile_table(path: str | os.PathLike[str]) -> dict[str, WebGPUTile]:
    """The tiles of a tile table file (:func:`write_tile_table`), by :attr:`GemmShape.key`; a
    ``ValueError`` naming the file for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the WebGPU tile table {os.fspath(path)}: {err}") from err
    if not isinstance(data, dict) or data.get("format") != TILE_TABLE_FORMAT or not isinstance(data.get("tiles"), dict):
        raise ValueError(f"{os.fspath(path)} is not a WebGPU tile table (format {TILE_TABLE_FORMAT!r})")
    names = {f.name for f in dataclasses.fields(WebGPUTile)}
    tiles = {}
    for key, entry in data["tiles"].items():
        values = entry.get("tile") if isinstance(entry, dict) else None
        if not isinstance(values, dict) or set(values) - names:
            raise ValueError(f"{os.fspath(path)}: entry {key!r} has no tile of the fields {sorted(names)}")
        try:
            tiles[key] = WebGPUTile(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{os.fspath(path)}: entry {key!r}: {err}") from err
    return tiles


def write_tile_table(
    path: str | os.PathLike[str],
    tiles: Mapping[str, WebGPUTile],
    about: Mapping[str, object] | None = None,
    notes: Mapping[str, Mapping[str, object]] | None = None,
) -> None:
    """Write ``tiles`` (by :attr:`GemmShape.key`) as a tile table: ``about`` says where they were
    measured, ``notes[key]`` what was measured for a shape. Written to a temporary file and renamed."""
    entries = {
        key: {"tile": dataclasses.asdict(tiles[key]), **dict((notes or {}).get(key, {}))} for key in sorted(tiles)
    }
    write_table(path, {"format": TILE_TABLE_FORMAT, **dict(about or {}), "tiles": entries})


def write_table(path: str | os.PathLike[str], data: Mapping[str, object]) -> None:
    """``data`` as indented JSON at ``path``, written to a temporary file and renamed (a reader never
    sees half a table; an interrupted write leaves the old one)."""
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=1, sort_keys=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _gemm_extents(block: tirx.SBlock) -> tuple[int, int, int] | None:
    """(batch, rows, columns) of a normalised ``C[S, I, J]`` GEMM block with static extents."""
    extents = [iv.dom.extent for iv in block.iter_vars]
    if len(extents) != 4 or not all(isinstance(e, tirx.IntImm) for e in extents):
        return None
    return int(extents[0]), int(extents[1]), int(extents[2])


def _main_block(func: tirx.PrimFunc) -> tuple[s_tir.Schedule, s_tir.schedule.SBlockRV] | None:
    """A schedule of ``func`` and its one GEMM block, or None where it has none (or several)."""
    sch = s_tir.Schedule(func)
    blocks = get_reduction_blocks(sch, sch.get_child_blocks(sch.get_sblock("root")))
    if not blocks or len(blocks) != 1 or get_index_map(sch.get(blocks[0])) is None:
        return None
    return sch, blocks[0]


def _analyse(sch: s_tir.Schedule, main: s_tir.schedule.SBlockRV) -> GemmShape | None:
    """Normalise GEMM block ``main`` and read its :class:`GemmShape` (None for symbolic extents)."""
    contiguous = (_contiguous_axis(sch.get(main), 0), _contiguous_axis(sch.get(main), 1))
    normalise_gemm(sch, main)
    extents = _gemm_extents(sch.get(main))
    if extents is None:
        return None
    bits = max(region.source.dtype.bits for region in sch.get(main).reads[:2])
    return GemmShape(int(bits), *extents, int(sch.get(main).iter_vars[3].dom.extent), contiguous)


def gemm_shape(func: tirx.PrimFunc) -> GemmShape | None:
    """The :class:`GemmShape` of ``func``'s GEMM where :class:`WebGPUMatmul` could tile it, else None."""
    found = _main_block(func)
    if found is None:
        return None
    try:
        return _analyse(*found)
    except (AssertionError, s_tir.ScheduleError):
        return None


class WebGPUMatmul(dl.ScheduleRule):
    """Large-tile GEMM schedule for WebGPU (see the module docstring). ``tile`` fixes the tile for every
    GEMM (tests, benchmarks); ``tiles`` (a tile table) gives the tile of each shape it holds; elsewhere
    :func:`choose_webgpu_tile` picks one per shape. GEMMs with a non-batch axis shorter than
    ``min_extent`` (GEMVs, attention's 40-wide heads against 77 tokens) are left to the next rule."""

    def __init__(
        self, tile: WebGPUTile | None = None, min_extent: int = 32, tiles: Mapping[str, WebGPUTile] | None = None
    ) -> None:
        self.tile = tile
        self.min_extent = min_extent
        self.tiles = dict(tiles or {})

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "webgpu":
            return None
        found = _main_block(func)
        if found is None:
            return None
        sch, main = found
        try:
            shape = _analyse(sch, main)
            if shape is None or min(shape.m, shape.n, shape.k) < self.min_extent:
                return None
            return self._schedule(sch, main, shape, self._tile(shape, target))
        except (AssertionError, s_tir.ScheduleError):  # a layout the tiling cannot cover
            return None

    def _tile(self, shape: GemmShape, target: Target) -> WebGPUTile:
        """The fixed tile, else the table's for ``shape`` where it fits the target, else the rule's own."""
        threads = int(target.attrs.get("max_num_threads", 256))
        shared = int(target.attrs.get("max_shared_memory_per_block", 16384))
        if self.tile is not None:
            return self.tile
        listed = self.tiles.get(shape.key)
        if listed is not None and listed.fits(threads, shared, shape.bits // 8):
            return listed
        if listed is not None:
            log.info("the tile table's tile for %s does not fit the target's limits; using the rule's", shape.key)
        return choose_webgpu_tile(shape.batch, shape.m, shape.n, threads, shared, shape.bits // 8, shape.k)

    def _schedule(
        self, sch: s_tir.Schedule, main: s_tir.schedule.SBlockRV, shape: GemmShape, tile: WebGPUTile
    ) -> s_tir.Schedule:
        sch.pad_einsum(main, [1, tile.tile_i, tile.tile_j, tile.step_k])
        b, i, j, kk = sch.get_loops(main)
        bi, vi, ti, ii = sch.split(i, [None, tile.virtual_i, tile.threads_i, tile.micro_i // tile.virtual_i])
        bj, vj, tj, ij = sch.split(j, [None, tile.virtual_j, tile.threads_j, tile.micro_j // tile.virtual_j])
        ko, ki = sch.split(kk, [None, tile.step_k])
        kio, kii = sch.split(ki, [None, tile.vector_k])
        sch.reorder(bi, bj, vi, vj, ti, tj, ko, kio, kii, ii, ij)
        sch.bind(sch.fuse(b, bi), "blockIdx.y")
        sch.bind(bj, "blockIdx.x")
        sch.bind(vi, "vthread.y")
        sch.bind(vj, "vthread.x")
        sch.bind(ti, "threadIdx.y")
        sch.bind(tj, "threadIdx.x")
        sch.annotate(tj, ann_key="pragma_auto_unroll_max_step", ann_val=256)
        sch.annotate(tj, ann_key="pragma_unroll_explicit", ann_val=1)

        store = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(store, tj, preserve_unit_loops=True)
        for index in (0, 1):
            shared = _fetch(sch, main, ko, tile, index, shape.contiguous[index])
            _registers(sch, main, kio, shared, tile)
        auto_inline_consumer_chain(sch, store)
        sch.decompose_reduction(main, ko)
        if tile.prefetch:
            # ko's body: A's loads, A's copy, B's loads, B's copy, the multiply-adds. Each iteration
            # stores step k's registers to workgroup memory, issues step k + 1's loads into the freed
            # registers, then runs step k's multiply-adds, which hide those loads' latency.
            sch.annotate(ko, "software_pipeline_stage", [0, 1, 0, 1, 1])
            sch.annotate(ko, "software_pipeline_order", [2, 0, 3, 1, 4])
        return sch


def _contiguous_axis(block: tirx.SBlock, index: int) -> str:
    """Which GEMM axis of operand ``index`` walks its buffer's innermost dimension: "k" (the reduction)
    or "mn" (the rows of A, the columns of B), from the block before normalisation."""
    region = block.reads[index].region
    inner = region[-1].min
    reduce_vars = [iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    spatial_vars = [iv.var for iv in block.iter_vars if iv.iter_type != tirx.IterVar.CommReduce]
    # An inner index that mixes both (an NCHW convolution's w + kx) walks with the output pixels: the
    # reduction's part of it (kx) is short.
    if any(uses_var(inner, v) for v in spatial_vars):
        return "mn"
    return "k" if any(uses_var(inner, v) for v in reduce_vars) else "mn"


def _fetch(
    sch: s_tir.Schedule,
    main: s_tir.schedule.SBlockRV,
    ko: s_tir.schedule.LoopRV,
    tile: WebGPUTile,
    index: int,
    contiguous: str,
) -> s_tir.schedule.SBlockRV:
    """Operand ``index``'s tile into workgroup memory, copied by every thread along its contiguous axis:
    ``vector_k`` elements a thread where that axis is the reduction, one where it is rows or columns.
    With ``tile.prefetch`` the copy goes through registers (a ``local`` stage that reads global memory),
    so the software pipeline can issue the next step's loads before this step's multiply-adds."""
    copy = sch.cache_read(main, index, "shared")
    sch.compute_at(copy, ko, preserve_unit_loops=True)
    vector = tile.vector_k if contiguous == "k" else 1
    loads = copy
    if tile.prefetch:
        loads = sch.cache_read(copy, 0, "local")
        sch.compute_at(loads, ko, preserve_unit_loops=True)
        _spread(sch, loads, tile, contiguous, vector)
        # A thread's registers hold its own run of the tile: fold the tile-shaped buffer onto that run,
        # which region compaction leaves as a tile-offset expression Tint cannot index as a constant.
        run = _per_thread(tile, tile.tile_i if index == 0 else tile.tile_j, contiguous)
        axis = -1 if contiguous == "k" else -2
        sch.transform_layout(loads, ("write", 0), lambda *idx: (idx[axis] % run,), assume_injective_transform=True)
    _spread(sch, copy, tile, contiguous, vector)
    ndim = len(sch.get(copy).writes[0].source.shape)
    # rows step_k + pad apart: 4-wide reads of one row stay aligned, a subgroup's rows spread over banks
    sch.storage_align(copy, 0, axis=ndim - 2, factor=tile.step_k, offset=tile.row_pad)
    auto_inline_producers(sch, loads)
    return copy


def _per_thread(tile: WebGPUTile, rows: int, contiguous: str) -> int:
    """Elements of a ``rows x step_k`` operand tile that one thread copies with ``prefetch``: adjacent
    elements along the contiguous axis, starting at a multiple of their count."""
    run = rows * tile.step_k // tile.threads
    assert run * tile.threads == rows * tile.step_k and (tile.step_k if contiguous == "k" else rows) % run == 0
    return run


def _spread(
    sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, tile: WebGPUTile, contiguous: str, vector: int
) -> None:
    """A tile copy's (rows, step_k) loops over the workgroup's threads, neighbouring threads on
    neighbouring elements of the ``contiguous`` axis, ``vector`` elements a thread."""
    rows, cols = sch.get_loops(block)[-2:]  # (tile_i or tile_j, step_k)
    if contiguous == "mn":
        sch.reorder(cols, rows)
    fused = sch.fuse(*sch.get_loops(block)[-2:])
    if tile.prefetch:
        # each thread's elements adjacent (a warp still reads whole sectors), so its registers hold one
        # compact run that indexes as constants
        ty, tx, _, vec = sch.split(fused, [tile.threads_i, tile.threads_j, None, vector])
    else:
        _, ty, tx, vec = sch.split(fused, [None, tile.threads_i, tile.threads_j, vector])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    if vector > 1:
        sch.vectorize(vec)


def _registers(
    sch: s_tir.Schedule,
    main: s_tir.schedule.SBlockRV,
    kio: s_tir.schedule.LoopRV,
    shared: s_tir.schedule.SBlockRV,
    tile: WebGPUTile,
) -> None:
    """A thread's rows (or columns) of ``vector_k`` reduction steps from workgroup memory into registers,
    one ``vector_k``-wide read each, before the multiply-adds that use them."""
    if tile.vector_k == 1:
        return
    buffer = sch.get(shared).writes[0].source
    index = next(i for i, r in enumerate(sch.get(main).reads) if r.source.same_as(buffer))
    local = sch.cache_read(main, index, "local")
    sch.compute_at(local, kio, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(local)[-1])

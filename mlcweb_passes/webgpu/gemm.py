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
"""

from __future__ import annotations

import dataclasses
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

__all__ = ["DEEP_STEP_K", "FILL_WORKGROUPS", "WebGPUMatmul", "WebGPUTile", "choose_webgpu_tile"]

FILL_WORKGROUPS = 256  # workgroups of large tiles that keep a desktop GPU's compute units busy
DEEP_STEP_K = 32  # reduction depth a step where the workgroup memory holds it: half the barriers


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


LARGE = WebGPUTile(16, 16, 8, 8, 8, 8, 16)  # 128 x 128
MEDIUM = WebGPUTile(16, 16, 4, 4, 4, 4, 16)  # 64 x 64
SMALL = WebGPUTile(8, 16, 4, 4, 4, 4, 16)  # 32 x 64


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
        fits = tile.threads <= max_threads and tile.shared_bytes(dtype_bytes) <= max_shared
        if fits and blocks >= FILL_WORKGROUPS:
            return _deeper(tile, max_shared, dtype_bytes, k)
    tile = MEDIUM if MEDIUM.threads <= max_threads and m >= 64 else SMALL
    return _deeper(tile, max_shared, dtype_bytes, k)


def _deeper(tile: WebGPUTile, max_shared: int, dtype_bytes: int, k: int | None) -> WebGPUTile:
    # float16 operands only: 32-deep steps made float32's 64x64 tiles slower (benchmarks/README.md)
    if k is None or tile.step_k >= DEEP_STEP_K or dtype_bytes > 2:
        return tile
    deep = dataclasses.replace(tile, step_k=DEEP_STEP_K)
    same_padding = -(-k // DEEP_STEP_K) * DEEP_STEP_K == -(-k // tile.step_k) * tile.step_k
    return deep if same_padding and deep.shared_bytes(dtype_bytes) <= max_shared else tile


def _gemm_extents(block: tirx.SBlock) -> tuple[int, int, int] | None:
    """(batch, rows, columns) of a normalised ``C[S, I, J]`` GEMM block with static extents."""
    extents = [iv.dom.extent for iv in block.iter_vars]
    if len(extents) != 4 or not all(isinstance(e, tirx.IntImm) for e in extents):
        return None
    return int(extents[0]), int(extents[1]), int(extents[2])


class WebGPUMatmul(dl.ScheduleRule):
    """Large-tile GEMM schedule for WebGPU (see the module docstring). ``tile`` fixes the tile for every
    GEMM (tests, benchmarks); by default :func:`choose_webgpu_tile` picks one per shape. GEMMs with a
    non-batch axis shorter than ``min_extent`` (GEMVs, attention's 40-wide heads against 77 tokens) are
    left to the next rule."""

    def __init__(self, tile: WebGPUTile | None = None, min_extent: int = 32) -> None:
        self.tile = tile
        self.min_extent = min_extent

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "webgpu":
            return None
        sch = s_tir.Schedule(func)
        blocks = get_reduction_blocks(sch, sch.get_child_blocks(sch.get_sblock("root")))
        if not blocks or len(blocks) != 1:
            return None
        main = blocks[0]
        if get_index_map(sch.get(main)) is None:
            return None
        try:
            return self._schedule(sch, main, target)
        except (AssertionError, s_tir.ScheduleError):  # a layout the tiling cannot cover
            return None

    def _schedule(self, sch: s_tir.Schedule, main: s_tir.schedule.SBlockRV, target: Target) -> s_tir.Schedule | None:
        contiguous = [_contiguous_axis(sch.get(main), index) for index in (0, 1)]
        normalise_gemm(sch, main)
        extents = _gemm_extents(sch.get(main))
        if extents is None:
            return None
        batch, m, n = extents
        k = int(sch.get(main).iter_vars[3].dom.extent)
        if min(m, n, k) < self.min_extent:
            return None
        threads = int(target.attrs.get("max_num_threads", 256))
        shared = int(target.attrs.get("max_shared_memory_per_block", 16384))
        operand_bytes = max(region.source.dtype.bits for region in sch.get(main).reads[:2]) // 8
        tile = self.tile or choose_webgpu_tile(batch, m, n, threads, shared, operand_bytes, k)
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
            shared = _fetch(sch, main, ko, tile, index, contiguous[index])
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

"""A CUDA schedule rule: float16 matmuls and convolutions on tensor cores, with a tile chosen per shape.

dlight's ``Matmul`` rule sends a float16 GEMM to tensor cores (``MatmulTensorization``) only when every
dimension is longer than 64, and then always with one tile: 128x128 outputs per thread block, 16 warps
of 32x32. Stable Diffusion's UNet is mostly GEMMs that tile badly that way:

- attention has a head dimension of 40 (the reduction of ``Q @ K^T``, the output width of ``P @ V``)
  and 77 text tokens, which dlight leaves on CUDA cores;
- its deep convolutions are implicit GEMMs of 128 to 512 rows (batch 2 x 8x8 or 16x16 pixels) by 1280
  channels: 10 to 40 blocks of 128x128, fewer than an H100 has multiprocessors;
- 320 channels pad to 384 in 128-wide tiles, a sixth of the work thrown away.

:class:`TensorCoreMatmul` puts every float16 GEMM (matmuls, and convolutions as implicit GEMMs) on
tensor cores, on CUDA sm_70+, when its shortest non-batch axis is at least ``min_extent``.

Our own tiles take the GEMMs whose axes are all 64 or longer and whose inputs are stored with a
reduction axis innermost (NHWC convolutions after :class:`~mlcweb_passes.ConvLayout`, linear layers
after :class:`~mlcweb_passes.LinearWeightLayout`), with WMMA 16x16x16 fragments:

1. the block is normalised to ``C[S, I, J] += A[S, I, K] * B[S, J, K]`` (dlight's index maps) and padded
   to the tile;
2. a thread block computes a :class:`TensorCoreTile`: ``warps_m x warps_n`` warps, each holding
   ``frags_m x frags_n`` accumulator fragments, stepping over the reduction ``chunk_k`` fragments at a
   time through shared memory, double-buffered (``software_pipeline_*`` annotations); on sm_80+ the
   global-to-shared copies are asynchronous (``cp.async``) when the build's ``PassContext`` sets
   ``tirx.use_async_copy`` (:func:`~mlcweb_passes.targets.async_copy_config`);
3. the epilogue (casts, bias, residual adds fused after the GEMM) runs on the tile in shared memory and
   stores it with vector writes.

The tile comes from :func:`choose_tile`, a rule measured with ``benchmarks/gemm_tiles.py``, for the
multiprocessor count, thread and shared-memory limits of :func:`~mlcweb_passes.targets.gpu_facts`.

The other GEMMs (an axis of 16 to 63, like attention's head dimension of 40, or a reduction axis that
is strided in memory) get dlight's ``MatmulTensorization``, the short axis zero-padded: our copies move
16-byte vectors along K, and faulted with misaligned addresses on those shapes. Shorter axes (GEMVs)
fall through to the next rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.gpu.matmul import (
    MatmulTensorization,
    auto_inline_consumer_chain,
    auto_inline_producers,
    get_in_out_dtypes,
    get_index_map,
    get_reduction_blocks,
)
from tvm.target import Target

from .._tir import normalise_gemm, uses_var
from ..targets import GpuFacts, async_copy_config, gpu_facts, sm_version

__all__ = ["TensorCoreMatmul", "TensorCoreTile", "choose_tile", "gemm_shape"]

FRAGMENT = 16  # WMMA fragment edge (m16n16k16)
TILED_MIN_EXTENT = 64  # GEMMs with a shorter axis keep dlight's fixed tiling
WARP = 32
STAGES = 2  # shared-memory buffers per input tile (double-buffered)


@dataclass(frozen=True)
class TensorCoreTile:
    """One thread block's share of a GEMM: ``warps_m x warps_n`` warps, each computing ``frags_m x
    frags_n`` 16x16 WMMA fragments, over reduction steps of ``chunk_k`` fragments streamed through a
    double-buffered shared-memory ring.
    """

    warps_m: int = 2
    warps_n: int = 2
    frags_m: int = 4
    frags_n: int = 4
    chunk_k: int = 2

    @property
    def block_m(self) -> int:
        return self.warps_m * self.frags_m * FRAGMENT

    @property
    def block_n(self) -> int:
        return self.warps_n * self.frags_n * FRAGMENT

    @property
    def block_k(self) -> int:
        return self.chunk_k * FRAGMENT

    @property
    def warps(self) -> int:
        return self.warps_m * self.warps_n

    def lowers(self) -> bool:
        """Whether TIR lowering accepts the tile: when the float32 output tile fits in the space of one
        input tile's two buffers, StorageRewrite puts it there, and the WMMA store then addresses a
        float16 buffer, which codegen refuses. Tiles whose output tile is larger are safe."""
        return all(
            self._output_bytes() > STAGES * 2 * rows * (self.block_k + 8) for rows in (self.block_m, self.block_n)
        )

    def shared_bytes(self) -> int:
        """Dynamic shared memory: the larger of the float16 input tiles, two buffers each (rows
        padded by 8), and the float32 output tile (rows padded by 4); lowering reuses one for the other."""
        inputs = STAGES * 2 * (self.block_m + self.block_n) * (self.block_k + 8)
        return max(inputs, self._output_bytes())

    def _output_bytes(self) -> int:
        """The float32 output tile in shared memory, rows padded by 4."""
        return 4 * self.block_m * (self.block_n + 4)


@dataclass(frozen=True)
class GemmShape:
    batch: int
    m: int
    n: int
    k: int


def gemm_shape(block: tirx.SBlock) -> GemmShape | None:
    """The GEMM a reduction block computes: batch, rows, columns and reduction length, or None when the
    block is not a static-shaped two-input GEMM."""
    if len(block.reads) < 2 or len(block.writes) != 1:
        return None
    a, b, c = block.reads[0].region, block.reads[1].region, block.writes[0].region
    dims = {"batch": 1, "m": 1, "n": 1, "k": 1}
    for iv in block.iter_vars:
        if not isinstance(iv.dom.extent, tirx.IntImm):
            return None
        extent = int(iv.dom.extent.value)
        in_a, in_b, in_c = (any(uses_var(r.min, iv.var) for r in region) for region in (a, b, c))
        if in_c and in_a and in_b:
            kind = "batch"
        elif in_c and in_a:
            kind = "m"
        elif in_c and in_b:
            kind = "n"
        elif in_a and in_b and iv.iter_type == tirx.IterVar.CommReduce:
            kind = "k"
        else:
            return None
        dims[kind] *= extent
    return GemmShape(**dims)


# benchmarks/gemm_tiles.py over SD1.5's NHWC convolutions: 128x128 tiles of 4 warps with 64-deep
# reduction steps were the fastest or within 10% of it for every kernel with at least half a wave of
# blocks; below that, 64x64 tiles fill more multiprocessors (numbers in benchmarks/README.md).
LARGE_TILES = (TensorCoreTile(2, 2, 4, 4, 4), TensorCoreTile(2, 2, 4, 4, 2), TensorCoreTile(2, 2, 4, 2, 2))
SMALL_TILE = TensorCoreTile(2, 2, 2, 2, 2)


@cache
def choose_tile(shape: GemmShape, gpu: GpuFacts) -> TensorCoreTile:
    """The tile for ``shape`` on ``gpu``: the largest of :data:`LARGE_TILES` that fits its limits, unless
    it makes fewer than half a wave of blocks; then :data:`SMALL_TILE`."""
    fits = [t for t in LARGE_TILES if t.warps * WARP <= gpu.max_threads and t.shared_bytes() <= gpu.max_shared_bytes]
    large = fits[0] if fits else SMALL_TILE
    blocks = shape.batch * math.ceil(shape.m / large.block_m) * math.ceil(shape.n / large.block_n)
    return large if blocks >= gpu.sm_count // 2 else SMALL_TILE


class TensorCoreMatmul(dl.ScheduleRule):
    """Tensor-core schedule for float16 GEMMs whose shortest non-batch axis is at least ``min_extent``.

    ``tile`` fixes the tile for every GEMM (benchmarks, tests); by default :func:`choose_tile` picks one
    per shape for ``gpu`` (:func:`~mlcweb_passes.targets.gpu_facts` of the target when not given).
    """

    def __init__(self, min_extent: int = 16, tile: TensorCoreTile | None = None, gpu: GpuFacts | None = None) -> None:
        if tile is not None and not tile.lowers():
            raise ValueError(f"{tile} does not lower: its float32 output tile fits in an input tile's space")
        self.min_extent = min_extent
        self.tile = tile
        self.gpu = gpu

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        sm = sm_version(target)
        if not isinstance(func, tirx.PrimFunc) or sm < 70 or "dlight.do_not_tensorize" in func.attrs:
            return None
        sch = s_tir.Schedule(func)
        blocks = get_reduction_blocks(sch, sch.get_child_blocks(sch.get_sblock("root")))
        if not blocks:
            return None
        block = sch.get(blocks[0])
        if get_index_map(block) is None or get_in_out_dtypes(block)[0] != "float16":
            return None
        shape = gemm_shape(block)
        if shape is None or min(shape.m, shape.n, shape.k) < self.min_extent:
            return None
        try:
            if min(shape.m, shape.n, shape.k) < TILED_MIN_EXTENT or not _reads_contiguous_along_k(sch, blocks[0]):
                # Short axes (attention's head dimension 40) or a strided K (a [K, N] weight): dlight's
                # fixed tiling, zero-padded. Our tiles fault with misaligned addresses on these (H100).
                result: s_tir.Schedule | None = MatmulTensorization().apply(func, target, tunable)
                return result
            tile = self.tile or choose_tile(shape, self.gpu or gpu_facts(target))
            return _schedule(sch, blocks[0], tile, async_copy=bool(async_copy_config(target)))
        except (AssertionError, s_tir.ScheduleError):  # a shape the tiling cannot cover
            return None


def _innermost_var(region: list) -> tirx.Var | None:
    """The one variable the innermost index of ``region`` uses, or None (a constant, or several)."""
    used = tirx.analysis.undefined_vars(region[-1].min)
    return used[0] if len(used) == 1 else None


def _reads_contiguous_along_k(sch: s_tir.Schedule, main: s_tir.schedule.SBlockRV) -> bool:
    """Whether both GEMM inputs are stored with a reduction axis innermost, so that the tile copies'
    16-byte vectors are contiguous in global memory. An input computed in the same kernel (convolution
    padding, casts) counts when its producer keeps the layout: its own reads have the innermost index of
    what it writes."""
    block = sch.get(main)
    reduce_vars = [iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    for read in block.reads[:2]:
        var = _innermost_var(read.region)
        if var is None or not any(var.same_as(r) for r in reduce_vars):
            return False
        for producer in sch.get_producers(main):
            p = sch.get(producer)
            if not any(w.source.same_as(read.source) for w in p.writes):
                continue
            written = _innermost_var(p.writes[0].region)
            if written is None or any(not written.same_as(_innermost_var(r.region)) for r in p.reads):
                return False
    return True


def _schedule(
    sch: s_tir.Schedule, main: s_tir.schedule.SBlockRV, tile: TensorCoreTile, async_copy: bool
) -> s_tir.Schedule:
    """Schedule GEMM block ``main`` as ``tile``s of WMMA fragments (the steps of the module docstring)."""
    out_dtype = _normalise(sch, main, tile)
    outer, k_outer, k_inner, warp = _tile_loops(sch, main, tile)
    _stage_in_shared(sch, outer, k_outer, tile, 0)
    _stage_in_shared(sch, outer, k_outer, tile, 1)
    frag_a = sch.cache_read(outer, 0, "wmma.matrix_a")
    frag_b = sch.cache_read(outer, 1, "wmma.matrix_b")
    sch.compute_at(frag_a, k_inner)
    sch.compute_at(frag_b, k_inner)
    # accumulators -> shared tile -> epilogue and global store
    staged = sch.cache_write(outer, 0, "shared.dyn")
    sch.storage_align(staged, 0, axis=-2, factor=16, offset=4)
    accum = sch.cache_write(outer, 0, "wmma.accumulator")
    sch.reverse_compute_at(accum, warp)
    sch.reverse_compute_at(staged, warp)
    init = sch.decompose_reduction(outer, k_outer)
    _tensorize(sch, main, init, {"load_a": frag_a, "load_b": frag_b, "store": accum}, out_dtype)
    auto_inline_consumer_chain(sch, staged)
    fused = sch.fuse(*sch.get_loops(staged)[-2:])
    _, tx, vec = sch.split(fused, [None, WARP, 4])
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vec)
    _pipeline(sch, k_outer, k_inner, async_copy)
    return sch


def _normalise(sch: s_tir.Schedule, main: s_tir.schedule.SBlockRV, tile: TensorCoreTile) -> str:
    """``C[S, I, J] += A[S, I, K] * B[S, J, K]``, padded to whole tiles; returns C's dtype."""
    normalise_gemm(sch, main)
    sch.pad_einsum(main, [1, tile.block_m, tile.block_n, tile.block_k])
    return str(get_in_out_dtypes(sch.get(main))[1])


def _tile_loops(
    sch: s_tir.Schedule, main: s_tir.schedule.SBlockRV, tile: TensorCoreTile
) -> tuple[s_tir.schedule.SBlockRV, s_tir.schedule.LoopRV, s_tir.schedule.LoopRV, s_tir.schedule.LoopRV]:
    """16x16x16 fragments under block / warp / fragment loops: the fragment block, the outer and inner
    reduction loops and the warp loop."""
    batch, i, j, k = sch.get_loops(main)
    i, i_frag = sch.split(i, [None, FRAGMENT])
    j, j_frag = sch.split(j, [None, FRAGMENT])
    k, k_frag = sch.split(k, [None, FRAGMENT])
    sch.reorder(i, j, k, i_frag, j_frag, k_frag)
    outer = sch.blockize(i_frag)
    i_block, i_warp, i_inner = sch.split(i, [None, tile.warps_m, tile.frags_m])
    j_block, j_warp, j_inner = sch.split(j, [None, tile.warps_n, tile.frags_n])
    k_outer, k_inner = sch.split(k, [None, tile.chunk_k])
    sch.reorder(i_block, j_block, i_warp, j_warp, k_outer, k_inner, i_inner, j_inner)
    sch.bind(batch, "blockIdx.y")
    sch.bind(sch.fuse(i_block, j_block), "blockIdx.x")
    warp = sch.fuse(i_warp, j_warp)
    sch.bind(warp, "threadIdx.y")
    return outer, k_outer, k_inner, warp


def _stage_in_shared(
    sch: s_tir.Schedule,
    outer: s_tir.schedule.SBlockRV,
    k_outer: s_tir.schedule.LoopRV,
    tile: TensorCoreTile,
    index: int,
) -> None:
    """Input ``index``'s tile through shared memory, 16-byte vector copies by all warps; im2col, padding
    and casts happen on the way in."""
    copy = sch.cache_read(outer, index, "shared.dyn")
    sch.compute_at(copy, k_outer)
    fused = sch.fuse(*sch.get_loops(copy)[-2:])
    _, ty, tx, vec = sch.split(fused, [None, tile.warps, WARP, 8])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vec)
    sch.storage_align(copy, 0, axis=-2, factor=16, offset=8)  # rows 16 bytes apart in banks
    auto_inline_producers(sch, copy)


def _tensorize(
    sch: s_tir.Schedule,
    main: s_tir.schedule.SBlockRV,
    init: s_tir.schedule.SBlockRV,
    fragments: dict[str, s_tir.schedule.SBlockRV],
    out_dtype: str,
) -> None:
    """WMMA intrinsics for the fragment loads and store, the accumulator init and the multiply-add."""
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

    intrins = get_wmma_intrin_group("shared.dyn", "shared.dyn", "float16", out_dtype, trans_b=True)
    for name, frag in fragments.items():
        fi, fj = sch.get_loops(frag)[-2:]
        fi_outer, fi_frag = sch.split(fi, [None, FRAGMENT])
        fj_outer, fj_frag = sch.split(fj, [None, FRAGMENT])
        sch.reorder(fi_outer, fj_outer, fi_frag, fj_frag)
        sch.tensorize(fi_frag, intrins[name])
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], intrins["init"])
    sch.tensorize(sch.get_loops(main)[-3], intrins["compute"])


def _pipeline(
    sch: s_tir.Schedule, k_outer: s_tir.schedule.LoopRV, k_inner: s_tir.schedule.LoopRV, async_copy: bool
) -> None:
    """Software pipelines: fragment loads one step ahead of the mma; the shared copies of the next
    reduction chunk ahead of the whole inner pipeline (its prologue, body and epilogue once lowered)."""
    sch.annotate(k_inner, "software_pipeline_stage", [0, 0, 1])
    sch.annotate(k_inner, "software_pipeline_order", [0, 1, 2])
    last = STAGES - 1
    sch.annotate(k_outer, "software_pipeline_stage", [0, 0, last, last, last])
    sch.annotate(k_outer, "software_pipeline_order", [0, 1, 2, 3, 4])
    if async_copy:
        sch.annotate(k_outer, "software_pipeline_async_stages", [0])

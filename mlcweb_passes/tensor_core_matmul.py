"""A CUDA schedule rule: float16 matmuls and convolutions on tensor cores, with a tile chosen per shape.

dlight's ``Matmul`` rule sends a float16 GEMM to tensor cores (``MatmulTensorization``) only when every
dimension is longer than 64, and then always with one tile: 128x128 outputs per thread block, 16 warps
of 32x32. Stable Diffusion's UNet is mostly GEMMs that tile badly that way:

- attention has a head dimension of 40 (the reduction of ``Q @ K^T``, the output width of ``P @ V``)
  and 77 text tokens, which dlight leaves on CUDA cores;
- its deep convolutions are implicit GEMMs of 128 to 512 rows (batch 2 x 8x8 or 16x16 pixels) by 1280
  channels: 10 to 40 blocks of 128x128 for an H100's 132 SMs;
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
   ``tirx.use_async_copy`` (:data:`ASYNC_COPY_CONFIG`);
3. the epilogue (casts, bias, residual adds fused after the GEMM) runs on the tile in shared memory and
   stores it with vector writes.

The tile comes from :func:`choose_tile`, a rule measured on an H100 with ``benchmarks/gemm_tiles.py``.

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
    check_sm_version,
    get_in_out_dtypes,
    get_index_map,
    get_reduction_blocks,
)
from tvm.target import Target

from ._base import uses_var

__all__ = [
    "ASYNC_COPY_CONFIG",
    "TensorCoreMatmul",
    "TensorCoreTile",
    "async_copy_config",
    "choose_tile",
    "gemm_shape",
]

# PassContext config under which TIR lowering turns the tiles' pipelined global-to-shared copies into
# cp.async (sm_80+); without it the copies are synchronous and the kernels are still correct.
ASYNC_COPY_CONFIG = {"tirx.use_async_copy": True}

FRAGMENT = 16  # WMMA fragment edge (m16n16k16)
TILED_MIN_EXTENT = 64  # GEMMs with a shorter axis keep dlight's fixed tiling
WARP = 32


@dataclass(frozen=True)
class TensorCoreTile:
    """One thread block's share of a GEMM: ``warps_m x warps_n`` warps, each computing ``frags_m x
    frags_n`` 16x16 fragments, over reduction steps of ``chunk_k`` fragments.

    ``mma`` keeps the fragments in registers in ``ldmatrix``'s order and multiplies them with
    ``mma.sync`` instead of WMMA; ``stages`` is the depth of the shared-memory ring the reduction steps
    stream through (2: double-buffered). On an H100 neither paid off for SD1.5's GEMMs
    (``benchmarks/results/2026-11-24-h100-gemm_tiles-mma.md``: the default tiles' weighted sum 142 ms,
    mma.sync with 2-4 stages 151-167 ms), so :func:`choose_tile` keeps WMMA with two stages; the options
    stay for other GPUs and for ``benchmarks/gemm_tiles.py``.
    """

    warps_m: int = 2
    warps_n: int = 2
    frags_m: int = 4
    frags_n: int = 4
    chunk_k: int = 2
    mma: bool = False
    stages: int = 2

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
        input tile's ``stages`` buffers, StorageRewrite puts it there, and the WMMA store then addresses a
        float16 buffer, which codegen refuses. Tiles whose output tile is larger are safe."""
        return all(
            self._output_bytes() > self.stages * 2 * rows * (self.block_k + 8) for rows in (self.block_m, self.block_n)
        )

    def shared_bytes(self) -> int:
        """Dynamic shared memory: the larger of the float16 input tiles, ``stages`` buffers each (rows
        padded by 8), and the float32 output tile (rows padded by 4); lowering reuses one for the other."""
        inputs = self.stages * 2 * (self.block_m + self.block_n) * (self.block_k + 8)
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


# Measured on an H100 (benchmarks/gemm_tiles.py, SD1.5's NHWC convolutions, 2026-11-24): 128x128 tiles
# of 4 warps with 64-deep reduction steps were the fastest or within 10% of it for every kernel with at
# least half a wave of blocks (conv 8192x320x2880: 0.077 ms against dlight's 0.114); below that, 64x64
# tiles fill more SMs (conv 512x1280x11520: 0.151 ms, 128x128: 0.168, dlight: 0.230).
LARGE_TILES = (TensorCoreTile(2, 2, 4, 4, 4), TensorCoreTile(2, 2, 4, 4, 2), TensorCoreTile(2, 2, 4, 2, 2))
SMALL_TILE = TensorCoreTile(2, 2, 2, 2, 2)


@cache
def choose_tile(
    shape: GemmShape, sms: int = 132, max_threads: int = 1024, max_shared: int = 99 * 1024
) -> TensorCoreTile:
    """The tile for ``shape`` on a GPU with ``sms`` multiprocessors: the largest of :data:`LARGE_TILES`
    that fits the limits, unless it makes fewer than half a wave of blocks; then :data:`SMALL_TILE`."""
    fits = [t for t in LARGE_TILES if t.warps * WARP <= max_threads and t.shared_bytes() <= max_shared]
    large = fits[0] if fits else SMALL_TILE
    blocks = shape.batch * math.ceil(shape.m / large.block_m) * math.ceil(shape.n / large.block_n)
    return large if blocks >= sms // 2 else SMALL_TILE


class TensorCoreMatmul(dl.ScheduleRule):
    """Tensor-core schedule for float16 GEMMs whose shortest non-batch axis is at least ``min_extent``.

    ``tile`` fixes the tile for every GEMM (benchmarks, tests); by default :func:`choose_tile` picks one
    per shape for ``sms`` multiprocessors (132: an H100 SXM).
    """

    def __init__(self, min_extent: int = 16, tile: TensorCoreTile | None = None, sms: int = 132) -> None:
        if tile is not None and not tile.lowers():
            raise ValueError(f"{tile} does not lower: its float32 output tile fits in an input tile's space")
        self.min_extent = min_extent
        self.tile = tile
        self.sms = sms

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
            tile = self.tile or choose_tile(shape, self.sms, *_limits(target, sm))
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


def sm_version(target: Target) -> int:
    """The SM version of a cuda target (90 for sm_90); -1 for other targets."""
    return check_sm_version(str(target.attrs.get("arch", ""))) if target.kind.name == "cuda" else -1


def async_copy_config(target: Target) -> dict[str, bool]:
    """:data:`ASYNC_COPY_CONFIG` for targets whose tiles copy asynchronously (cuda sm_80+), else empty:
    the PassContext config to build such a target's kernels with."""
    return dict(ASYNC_COPY_CONFIG) if sm_version(target) >= 80 else {}


def _limits(target: Target, sm: int) -> tuple[int, int]:
    threads = int(target.attrs.get("max_num_threads", 1024))
    # Dynamic shared memory above 48 KB needs an opt-in that TVM's CUDA runtime makes; sm_80+ have 99 KB+
    shared = 99 * 1024 if sm >= 80 else 48 * 1024
    return threads, shared


def _schedule(
    sch: s_tir.Schedule, main: s_tir.schedule.SBlockRV, tile: TensorCoreTile, async_copy: bool
) -> s_tir.Schedule:
    from tvm.s_tir.tensor_intrin.cuda import get_mma_intrin_group, get_wmma_intrin_group

    # 1. C[S, I, J] += A[S, I, K] * B[S, J, K], padded to whole tiles
    read_a, read_b = sch.reindex(main, ("read", 0)), sch.reindex(main, ("read", 1))
    write_c = sch.reindex(main, ("write", 0))
    maps = get_index_map(sch.get(main))
    assert maps is not None
    matmul_map, a_map, b_map, c_map = maps
    sch.transform_layout(read_a, ("write", 0), a_map)
    sch.transform_layout(read_b, ("write", 0), b_map)
    sch.transform_layout(write_c, ("read", 0), c_map)
    sch.transform_block_layout(main, matmul_map)
    sch.pad_einsum(main, [1, tile.block_m, tile.block_n, tile.block_k])
    out_dtype = get_in_out_dtypes(sch.get(main))[1]

    # 2. fragments of 16x16x16 under block / warp / fragment loops
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

    # 3. A and B tiles through shared memory, 16-byte vector copies by all warps
    def stage_in_shared(index: int) -> s_tir.schedule.SBlockRV:
        copy = sch.cache_read(outer, index, "shared.dyn")
        sch.compute_at(copy, k_outer)
        fused = sch.fuse(*sch.get_loops(copy)[-2:])
        _, ty, tx, vec = sch.split(fused, [None, tile.warps, WARP, 8])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(vec)
        sch.storage_align(copy, 0, axis=-2, factor=16, offset=8)  # rows 16 bytes apart in banks
        auto_inline_producers(sch, copy)  # im2col, padding and casts happen on the way in
        return copy

    stage_in_shared(0)
    stage_in_shared(1)
    frag_a = sch.cache_read(outer, 0, "warp" if tile.mma else "wmma.matrix_a")
    frag_b = sch.cache_read(outer, 1, "warp" if tile.mma else "wmma.matrix_b")
    sch.compute_at(frag_a, k_inner)
    sch.compute_at(frag_b, k_inner)

    # 4. accumulators -> shared tile -> epilogue and global store
    staged = sch.cache_write(outer, 0, "shared.dyn")
    sch.storage_align(staged, 0, axis=-2, factor=16, offset=4)
    accum = sch.cache_write(outer, 0, "warp" if tile.mma else "wmma.accumulator")
    sch.reverse_compute_at(accum, warp)
    sch.reverse_compute_at(staged, warp)
    init = sch.decompose_reduction(outer, k_outer)

    # 5. tensorize loads, init, mma and stores
    if tile.mma:
        intrins = get_mma_intrin_group("shared.dyn", "shared.dyn", "float16", out_dtype, False, True)
    else:
        intrins = get_wmma_intrin_group("shared.dyn", "shared.dyn", "float16", out_dtype, trans_b=True)
    for frag, name in ((frag_a, "load_a"), (frag_b, "load_b"), (accum, "store")):
        fi, fj = sch.get_loops(frag)[-2:]
        fi_outer, fi_frag = sch.split(fi, [None, FRAGMENT])
        fj_outer, fj_frag = sch.split(fj, [None, FRAGMENT])
        sch.reorder(fi_outer, fj_outer, fi_frag, fj_frag)
        if tile.mma:  # mma.sync keeps a 16x16 fragment as 32 threads x 8 values, in ldmatrix's order
            sch.transform_layout(frag, ("read", 0) if name == "store" else ("write", 0), _ldmatrix_layout)
        sch.tensorize(fi_frag, intrins[name])
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], intrins["init"])
    sch.tensorize(sch.get_loops(main)[-3], intrins["compute"])

    auto_inline_consumer_chain(sch, staged)
    fused = sch.fuse(*sch.get_loops(staged)[-2:])
    _, tx, vec = sch.split(fused, [None, WARP, 4])
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vec)

    # 6. software pipelines: fragment loads one step ahead of the mma; the shared copies of the next
    # reduction chunk ahead of the whole inner pipeline (its prologue, body and epilogue once lowered)
    sch.annotate(k_inner, "software_pipeline_stage", [0, 0, 1])
    sch.annotate(k_inner, "software_pipeline_order", [0, 1, 2])
    last = tile.stages - 1
    sch.annotate(k_outer, "software_pipeline_stage", [0, 0, last, last, last])
    sch.annotate(k_outer, "software_pipeline_order", [0, 1, 2, 3, 4])
    if async_copy:
        sch.annotate(k_outer, "software_pipeline_async_stages", [0])
    return sch


def _ldmatrix_layout(*index: tirx.PrimExpr) -> list[tirx.PrimExpr]:
    """A fragment buffer's index map for mma.sync: the last two axes become 16x16 fragments, each stored
    as the 32 threads x 8 values that ``ldmatrix`` and ``mma.sync`` use."""
    from tvm.s_tir.tensor_intrin.cuda import shared_16x16_to_ldmatrix_32x8_layout

    *outer, i, j = index
    thread, value = shared_16x16_to_ldmatrix_32x8_layout(i % FRAGMENT, j % FRAGMENT)
    return [*outer, i // FRAGMENT, j // FRAGMENT, thread, value]

"""A WebGPU schedule rule: GEMMs and convolutions with a handful of output columns, a warp per output row.

SD's last convolutions map many channels to a few: the UNet's ``conv_out`` (320 -> 4 channels over the
64x64 latents, a reduction of 2880) and the VAE's (128 -> 3 over 512x512 pixels, 1152). dlight's
``Matmul`` rule pads the few columns to a 32-column tile, so 7/8 of its multiply-adds are on zeros, and
each workgroup walks the whole reduction 8 elements at a time with a barrier each step: on an H100
through Dawn the VAE's took 1.5 ms, the slowest kernel outside the subgroup-matrix GEMMs
(benchmarks/README.md).

:class:`NarrowOutput` takes a function whose one reduction block computes
``C[..., j] += A[..., k] * B[j, ..., k]`` with at most ``max_cols`` columns ``j`` (the innermost spatial
axis) and the innermost reduction axis ``k`` innermost in both inputs (an NHWC convolution with an OHWI
kernel, a linear layer with its weight stored ``[N, K]``), its producers elementwise (a convolution's
zero padding, inlined into the loads):

- each "warp" (32 invocations, or the target's subgroup width where the library is built for subgroups)
  computes every column of one output row (a pixel); its lanes stride ``k`` in vectors of up to 4 and
  accumulate all columns in float32 registers, walking the other reduction axes (the window) in order;
- the lanes' partial sums meet in one cross-lane reduction per column (subgroup shuffles, or workgroup
  memory) and the fused epilogue (bias, casts) runs on the result in registers;
- a workgroup holds ``warps`` warps, so an M-row output launches M / ``warps`` workgroups.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.gpu.matmul import get_reduction_blocks
from tvm.target import Target

from .skinny_matmul import _inline_epilogue, _lanes, _sum_across_lanes

__all__ = ["NarrowOutput"]

_VECTORS = (4, 2, 1)  # elements a lane loads at once, the widest that divides its share of k


class NarrowOutput(dl.ScheduleRule):
    """Warp-per-row schedule for WebGPU GEMMs and NHWC convolutions of at most ``max_cols`` output
    columns (see the module docstring)."""

    def __init__(self, max_cols: int = 8, warps: int = 4) -> None:
        self.max_cols = max_cols
        self.warps = warps

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "webgpu":
            return None
        lanes = _lanes(target)
        if lanes * self.warps > int(target.attrs.get("max_num_threads", 1024)):
            return None
        sch = s_tir.Schedule(func)
        main = _narrow_block(sch, self.max_cols, lanes, self.warps)
        if main is None:
            return None
        try:
            return self._schedule(sch, main, lanes)
        except (AssertionError, s_tir.ScheduleError):
            return None

    def _schedule(self, sch: s_tir.Schedule, main: s_tir.schedule.SBlockRV, lanes: int) -> s_tir.Schedule:
        producers = sch.get_producers(main)  # a convolution's zero padding
        epilogue = _inline_epilogue(sch, main)
        block = sch.get(main)
        spatial = sum(iv.iter_type == tirx.IterVar.DataPar for iv in block.iter_vars)
        loops = sch.get_loops(main)
        rows, col, window, k = loops[: spatial - 1], loops[spatial - 1], loops[spatial:-1], loops[-1]
        extent = int(block.iter_vars[-1].dom.extent)
        vector = next(v for v in _VECTORS if extent % (lanes * v) == 0)
        row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
        row_block, row_warp = sch.split(row, [None, self.warps])
        k_outer, lane, vec = sch.split(k, [None, lanes, vector])
        sch.reorder(row_block, row_warp, lane, *window, k_outer, vec, col)  # A read once for all columns
        partial = sch.rfactor(lane, factor_axis=0)
        row_block, row_warp, lane = sch.get_loops(partial)[:3]
        sch.bind(row_block, "blockIdx.x")
        sch.bind(row_warp, "threadIdx.y")
        sch.bind(lane, "threadIdx.x")
        sch.set_scope(partial, 0, "local")
        # A's vector (read once for every column) and the weights' vectors for every column, in registers
        # once per reduction step; A's padding is computed as it is read (vector loads only without it)
        k_outer = sch.get_loops(partial)[-3]
        for index in (0, 1):  # reads: A, then B
            cached = sch.cache_read(partial, index, "local")
            sch.compute_at(cached, k_outer)
            if index == 1 or not producers:
                sch.vectorize(sch.get_loops(cached)[-1])
        for producer in producers:
            sch.compute_inline(producer)
        _sum_across_lanes(sch, main, epilogue, row_warp, lanes)  # one cross-lane reduction per column
        sch.decompose_reduction(partial, sch.get_loops(partial)[3])
        return sch


def _narrow_block(sch: s_tir.Schedule, max_cols: int, lanes: int, warps: int) -> s_tir.schedule.SBlockRV | None:
    """The function's one reduction block when it has the shape the module docstring describes (its
    producers elementwise, float16 or float32 inputs), else None."""
    blocks = get_reduction_blocks(sch, sch.get_child_blocks(sch.get_sblock("root")))
    if not blocks or len(blocks) != 1:
        return None
    main = blocks[0]
    for producer in sch.get_producers(main):
        if sch.get_producers(producer) or len(sch.get(producer).reads) != 1:  # padding only, one input
            return None
    block = sch.get(main)
    kinds = [iv.iter_type for iv in block.iter_vars]
    spatial = kinds.count(tirx.IterVar.DataPar)
    if spatial < 2 or kinds != [tirx.IterVar.DataPar] * spatial + [tirx.IterVar.CommReduce] * (len(kinds) - spatial):
        return None
    if len(block.reads) != 2 or len(block.writes) != 1 or len(sch.get_loops(main)) != len(kinds):
        return None
    if any(str(r.source.dtype) not in ("float16", "float32") for r in block.reads):
        return None
    extents = [iv.dom.extent for iv in block.iter_vars]
    if not all(isinstance(e, tirx.IntImm) for e in extents):
        return None
    col, k = block.iter_vars[spatial - 1].var, block.iter_vars[-1].var
    rows = 1
    for e in extents[: spatial - 1]:
        rows *= int(e)
    if int(extents[spatial - 1]) > max_cols or int(extents[-1]) % lanes or rows % warps:
        return None
    a, b = (r.region for r in block.reads)
    written = block.writes[0].region
    if not (a[-1].min.same_as(k) and b[-1].min.same_as(k) and b[0].min.same_as(col)):
        return None
    if not written[-1].min.same_as(col):  # the columns innermost in the output
        return None
    return main

"""A GPU schedule rule for reductions with few, long rows: group norm above all.

Group norm over an NCHW activation reduces ``batch x groups`` rows (64 in SD's UNet with guidance) of
``C/G x H x W`` elements each (40960 at 64x64 latents), then normalises every element. dlight's
``GeneralReduction`` puts the reduction and its elementwise consumer in one kernel and can only give
thread blocks to the loops the two share: the batch axis, so 2 thread blocks do all the work.

:class:`RowReduction` splits such a function into kernels shaped for their work:

- the reduction: one thread block per row, its threads striding over the row (coalesced reads) and
  combining partial results with a cross-thread reduction; the statistics go to a small global buffer;
- every spatial block after it (normalise, activation, cast): fully parallel, one thread per element.

With ``fuse_below``, rows up to that length keep the consumer in the reduction's kernel instead (a
thread block per row reduces, then normalises the same elements from L1): one launch, not two. That
is faster up to 10240-element rows and slower beyond (``benchmarks/group_norm.py``; the numbers are in
benchmarks/README.md), so the default rules use 10240. CUDA and WebGPU builds take it (WebGPU for the
dispatch it saves; not yet timed there), other GPU targets keep two kernels.

It applies only where dlight's rules do badly: one reduction block with at most ``max_rows`` rows of at
least ``min_row_length`` elements, reading one tensor (so it is not a matmul), with only spatial blocks
around it. Everything else falls through to the next rule.
"""

from __future__ import annotations

from functools import reduce

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from .._tir import buffer_loads, one_reduction, reduce_across_lanes
from ..targets import GPU_KINDS

__all__ = ["RowReduction"]


def _const_extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int | None:
    extent = sch.get(loop).extent
    return int(extent.value) if isinstance(extent, tirx.IntImm) else None


class RowReduction(dl.ScheduleRule):
    """One thread block per row for the reduction, one thread per element for its consumers."""

    def __init__(
        self, max_rows: int = 1024, min_row_length: int = 2048, threads: int = 256, fuse_below: int = 0
    ) -> None:
        self.max_rows = max_rows
        self.min_row_length = min_row_length
        self.threads = threads
        self.fuse_below = fuse_below  # rows up to this long: the consumer in the same kernel (one launch)

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name not in GPU_KINDS:
            return None
        found = one_reduction(func)
        if found is None:
            return None
        sch, infos, red = found
        kinds = red.dom_kind()
        loops = sch.get_loops(red.block_rv)
        n_s = len(kinds) - len(kinds.lstrip("S"))
        if "O" in kinds or kinds != "S" * n_s + "R" * (len(kinds) - n_s) or len(loops) != len(kinds) or n_s == 0:
            return None
        maybe = [_const_extent(sch, lp) for lp in loops]
        extents = [e for e in maybe if e is not None]
        if len(extents) != len(maybe):
            return None
        rows = reduce(lambda a, b: a * b, extents[:n_s], 1)
        length = reduce(lambda a, b: a * b, extents[n_s:], 1)
        block = sch.get(red.block_rv)
        inputs = {r.source for r in block.reads} - {w.source for w in block.writes}
        if rows > self.max_rows or length < self.min_row_length or len(inputs) != 1:
            return None

        if length <= self.fuse_below and target.kind.name in ("cuda", "webgpu"):  # measured on CUDA
            fused = self._one_kernel(func)
            if fused is not None:
                return fused
        row = sch.fuse(*loops[:n_s])
        outer, inner = sch.split(sch.fuse(*loops[n_s:]), factors=[None, self.threads])
        sch.reorder(row, inner, outer)
        sch.bind(row, "blockIdx.x")
        sch.bind(inner, "threadIdx.x")
        for info in infos:
            if info is red:
                continue
            fused = sch.fuse(*sch.get_loops(info.block_rv))
            bx, tx = sch.split(fused, factors=[None, self.threads])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
        return sch

    def _one_kernel(self, func: tirx.PrimFunc) -> s_tir.Schedule | None:
        """Reduction and consumer in one kernel, a thread block per row: the consumer's loops are split
        and reordered so the row it reads (``[n, c // group_size]`` for a group norm) is outermost, and
        the reduction is computed under it. For short rows this saves a launch and a pass over memory."""
        found = one_reduction(func)
        if found is None:
            return None
        sch, infos, red = found
        consumers = [info for info in infos if info is not red]
        if len(consumers) != 1:
            return None
        block = sch.get(consumers[0].block_rv)
        outputs = [w.source for w in sch.get(red.block_rv).writes]
        if not isinstance(block.body, tirx.BufferStore):
            return None
        reads = [x for x in buffer_loads(block.body.value) if any(x.source.same_as(b) for b in outputs)]
        loops = list(sch.get_loops(consumers[0].block_rv))
        iter_vars = [iv.var for iv in block.iter_vars]
        if not reads or len(loops) != len(iter_vars):
            return None
        slots: list[list[s_tir.schedule.LoopRV]] = [[lp] for lp in loops]  # each consumer loop, as split
        rows = []
        for index in reads[0].indices:
            if isinstance(index, tirx.IntImm):  # a unit axis (one image): no loop to take
                continue
            var, factor = (index, None) if isinstance(index, tirx.Var) else (getattr(index, "a", None), index)
            position = next((i for i, v in enumerate(iter_vars) if var is not None and v.same_as(var)), None)
            if position is None or len(slots[position]) != 1:
                return None
            if factor is not None:  # the row index is floor(var / c): its outer part after a split by c
                if not (isinstance(factor, tirx.FloorDiv) and isinstance(factor.b, tirx.IntImm)):
                    return None
                slots[position] = list(sch.split(slots[position][0], factors=[None, int(factor.b.value)]))
            rows.append(slots[position][0])
        if not rows:
            return None
        rest = [lp for slot in slots for lp in slot if not any(lp.same_as(r) for r in rows)]
        try:
            sch.reorder(*rows, *rest)
            bx = sch.fuse(*rows)
            _, tx = sch.split(sch.fuse(*rest), factors=[None, self.threads])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
            kinds = red.dom_kind()
            reduce_across_lanes(sch, red.block_rv, bx, len(kinds) - len(kinds.lstrip("S")), self.threads, "shared")
        except s_tir.ScheduleError:
            return None
        return sch

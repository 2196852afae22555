"""A GPU schedule rule for reductions with few, long rows: group norm above all.

Group norm over an NCHW activation reduces ``batch x groups`` rows (64 in SD's UNet with guidance) of
``C/G x H x W`` elements each (40960 at 64x64 latents), then normalises every element. dlight's
``GeneralReduction`` puts the reduction and its elementwise consumer in one kernel and can only give
thread blocks to the loops the two share: the batch axis, so 2 thread blocks do all the work (about
2.5 ms per call on an H100, half of SD's UNet step).

:class:`RowReduction` splits such a function into kernels shaped for their work:

- the reduction: one thread block per row, its threads striding over the row (coalesced reads) and
  combining partial results with a cross-thread reduction; the statistics go to a small global buffer;
- every spatial block after it (normalise, activation, cast): fully parallel, one thread per element.

It applies only where dlight's rules do badly: one reduction block with at most ``max_rows`` rows of at
least ``min_row_length`` elements, reading one tensor (so it is not a matmul), with only spatial blocks
around it. Everything else falls through to the next rule.
"""

from __future__ import annotations

from functools import reduce

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from ._base import GPU_KINDS, one_reduction

__all__ = ["RowReduction"]


def _const_extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int | None:
    extent = sch.get(loop).extent
    return int(extent.value) if isinstance(extent, tirx.IntImm) else None


class RowReduction(dl.ScheduleRule):
    """One thread block per row for the reduction, one thread per element for its consumers."""

    def __init__(self, max_rows: int = 1024, min_row_length: int = 2048, threads: int = 256) -> None:
        self.max_rows = max_rows
        self.min_row_length = min_row_length
        self.threads = threads

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

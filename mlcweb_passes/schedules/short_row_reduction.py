"""A GPU schedule rule (CUDA, WebGPU) for norms over many short rows: one warp per row (layer norm above all).

A transformer's layer norm reduces every token's channels: 8192 rows of 320 elements in SD's UNet at
64x64 latents. dlight's ``GeneralReduction`` gives each row a thread block of 256 threads, so each of the
two reductions (mean, then variance) is a block-wide reduction through shared memory with barriers, and
half the threads idle in the second pass over 320 elements: far below memory bandwidth
(``benchmarks/kernel_profile.py``).

:class:`ShortRowReduction` gives each row one warp instead, ``rows_per_block`` rows to a thread block
(``threadIdx.y``): the warp's 32 lanes stride over the row (coalesced), each reduction is a warp shuffle
whose result every lane keeps in a register (no shared memory, no barrier), and the elementwise block
after them (normalise, scale, shift, cast) runs on the same warp, reading the row again from L1.

On WebGPU a "warp" is 32 invocations along ``threadIdx.x``: with subgroups of 32 (the subgroup library)
each reduction is subgroup operations; without, a tree in workgroup memory over the row's 32 invocations,
still a small fraction of the 256-invocation block-wide trees dlight gives every row.

It applies only to CUDA and WebGPU functions whose blocks are reductions over the same leading row axes
and one elementwise block after them, with at least ``min_rows`` rows of at most ``max_row_length``
elements. Everything else falls through to the next rule.
"""

from __future__ import annotations

from functools import reduce

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from .._tir import inlined_blocks, reduce_across_lanes

__all__ = ["ShortRowReduction"]

WARP = 32


def _extents(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> list[int] | None:
    extents = [sch.get(loop).extent for loop in sch.get_loops(block)]
    return [int(e.value) for e in extents] if all(isinstance(e, tirx.IntImm) for e in extents) else None


def _row_axes(infos: list) -> int | None:
    """How many leading spatial axes every reduction shares (its rows), or None when the blocks are not
    reductions over one row set followed by one elementwise block."""
    *reductions, last = infos
    if not reductions or last.is_reduction() or not last.is_injective():
        return None
    rows = None
    for info in reductions:
        kinds = info.dom_kind()
        n_s = len(kinds) - len(kinds.lstrip("S"))
        if not info.is_reduction() or n_s == 0 or kinds != "S" * n_s + "R" * (len(kinds) - n_s):
            return None
        if rows not in (None, n_s):
            return None
        rows = n_s
    return rows


class ShortRowReduction(dl.ScheduleRule):
    """One warp per row for every reduction of a norm and its elementwise consumer."""

    def __init__(self, min_rows: int = 1024, max_row_length: int = 2048, rows_per_block: int = 4) -> None:
        self.min_rows = min_rows
        self.max_row_length = max_row_length
        self.rows_per_block = rows_per_block

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name not in ("cuda", "webgpu"):
            return None
        normalized = inlined_blocks(func)
        if normalized is None:
            return None
        sch, infos = normalized
        n_rows = _row_axes(infos)
        last = infos[-1].block_rv
        extents = _extents(sch, last)
        if n_rows is None or extents is None or len(extents) <= n_rows:
            return None
        rows = reduce(lambda a, b: a * b, extents[:n_rows], 1)
        length = reduce(lambda a, b: a * b, extents[n_rows:], 1)
        if rows < self.min_rows or length > self.max_row_length:
            return None
        try:
            return self._schedule(sch, infos, n_rows)
        except s_tir.ScheduleError:
            return None

    def _schedule(self, sch: s_tir.Schedule, infos: list, n_rows: int) -> s_tir.Schedule:
        loops = sch.get_loops(infos[-1].block_rv)
        bx, ty = sch.split(sch.fuse(*loops[:n_rows]), factors=[None, self.rows_per_block])
        _, tx = sch.split(sch.fuse(*loops[n_rows:]), factors=[None, WARP])
        sch.bind(bx, "blockIdx.x")
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        for info in reversed(infos[:-1]):  # consumers first: each reduction lands before its readers
            reduce_across_lanes(sch, info.block_rv, ty, n_rows, WARP, "local")
        return sch

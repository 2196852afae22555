"""The CPU schedule rule: parallel outer loops and a vectorisable inner axis."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from .._tir import inlined_blocks, uses_var

__all__ = ["CPUParallel"]


class CPUParallel(dl.ScheduleRule):
    """Parallel loops and a vectorisable inner axis for any PrimFunc on ``llvm``."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        normalized = inlined_blocks(func)
        if normalized is None:
            return None
        sch, infos = normalized
        reductions = []
        for info in infos:
            block = info.block_rv
            loops = sch.get_loops(block)
            kinds = info.dom_kind()
            if not loops or len(loops) != len(kinds) or "O" in kinds:
                continue
            s_loops = [lp for lp, k in zip(loops, kinds, strict=True) if k == "S"]
            r_loops = [lp for lp, k in zip(loops, kinds, strict=True) if k == "R"]
            inner: list[s_tir.schedule.LoopRV] = []
            if r_loops and len(s_loops) >= 2 and self._contiguous_last_axis(sch.get(block), kinds):
                inner = [s_loops.pop()]
            sch.reorder(*s_loops, *r_loops, *inner)
            if s_loops:
                sch.parallel(sch.fuse(*s_loops) if len(s_loops) > 1 else s_loops[0])
            if r_loops:
                reductions.append((block, r_loops[0]))
        for block, r_loop in reductions:
            sch.decompose_reduction(block, r_loop)
        return sch

    @staticmethod
    def _contiguous_last_axis(block: s_tir.SBlock, kinds: str) -> bool:
        """True when the last spatial axis is the last index of the output and of some input."""
        spatial = [iv.var for iv, k in zip(block.iter_vars, kinds, strict=False) if k == "S"]
        if not spatial or len(block.writes) != 1:
            return False
        last = spatial[-1]
        out_region = block.writes[0].region
        if not out_region or not uses_var(out_region[-1].min, last):
            return False
        return any(r.region and uses_var(r.region[-1].min, last) for r in block.reads)

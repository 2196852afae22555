"""Default schedules: give every PrimFunc a schedule fit for its target without tuning.

Legalized TIR is a plain loop nest: on a GPU it does not even build (nothing is bound to threads),
and on the CPU it runs on one core with the reduction innermost. This pass schedules each PrimFunc
that is not already scheduled (``tirx.is_scheduled``) with

- GPU targets: :class:`~mlcweb_passes.channels_last_norm.ChannelsLastNorm` (ours: group norm over
  large channels-last activations, on CUDA, its pixels split across thread blocks),
  :class:`~mlcweb_passes.row_reduction.RowReduction` (ours: group norm and other
  reductions with few long rows), :class:`~mlcweb_passes.short_row_reduction.ShortRowReduction` (ours:
  layer norm and other norms over many short rows, a warp per row, on CUDA) and
  :class:`~mlcweb_passes.tensor_core_matmul.TensorCoreMatmul` (ours:
  float16 matmuls with a short axis, as in attention, on tensor cores) and
  :class:`~mlcweb_passes.skinny_matmul.SkinnyMatmul` (ours: GEMMs of at most 8 rows, a warp per output
  column, on CUDA), then the ``tvm.s_tir.dlight``
  default GPU rules (Matmul, GEMV, Reduction, GeneralReduction, Fallback), as
  ``relax.get_default_pipeline`` would;
- ``llvm``: :class:`CPUParallel`, a rule of ours that inlines elementwise producers, runs the
  spatial loops in parallel and, for matmul- and conv-shaped reductions, moves the reduction
  outside the contiguous output axis so LLVM can vectorise it.

Functions it schedules get the attribute ``mlcweb.schedule = "default"``.
"""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from ._base import GPU_KINDS, ModulePassBase, inlined_blocks, uses_var
from .channels_last_norm import ChannelsLastNorm
from .row_reduction import RowReduction
from .short_row_reduction import ShortRowReduction
from .skinny_matmul import SkinnyMatmul
from .tensor_core_matmul import TensorCoreMatmul

log = logging.getLogger(__name__)

__all__ = ["CPUParallel", "DefaultSchedule", "default_rules", "is_gpu_target", "is_scheduled"]

SCHEDULED_ATTR = "tirx.is_scheduled"
SOURCE_ATTR = "mlcweb.schedule"  # "tuned", "default", or HAND_WRITTEN: where a PrimFunc's schedule came from
HAND_WRITTEN = "hand-written"  # kernels built already scheduled (flash attention)


def is_gpu_target(target: Target) -> bool:
    return target.kind.name in GPU_KINDS


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


def default_rules(target: Target) -> list[dl.ScheduleRule]:
    """The rules :class:`DefaultSchedule` applies for ``target``, in priority order."""
    if is_gpu_target(target):
        return [
            ChannelsLastNorm(),
            RowReduction(fuse_below=10240),  # one kernel for short rows: results/*group_norm-2-one-kernel*
            ShortRowReduction(),
            TensorCoreMatmul(),
            SkinnyMatmul(),
            dl.gpu.Matmul(),
            dl.gpu.GEMV(),
            dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(),
            dl.gpu.Fallback(),
        ]
    if target.kind.name == "llvm":
        return [CPUParallel()]
    raise ValueError(f"no default schedule rules for target kind {target.kind.name!r}")


@tvm.transform.module_pass(opt_level=0, name="mlcweb.DefaultSchedule")
class DefaultSchedule(ModulePassBase):
    """Schedule every not-yet-scheduled PrimFunc with :func:`default_rules` for ``target``."""

    def __init__(self, target: Target | None = None) -> None:
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        target = self.target or Target.current(allow_none=False)
        rules = default_rules(target)
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
                continue
            sch = None
            for rule in rules:
                try:
                    space = rule.apply(func, target, False)
                except (AssertionError, s_tir.ScheduleError, tvm.error.InternalError) as err:
                    # dlight's rules assert on epilogues they did not expect (GegluPairs' column pairs
                    # under dl.gpu.Matmul): the next rule, ending with Fallback, still schedules it
                    log.info("%s failed on %s (%s); trying the next rule", type(rule).__name__, gv.name_hint, err)
                    continue
                if space is not None:
                    sch = space[0] if isinstance(space, list) else space
                    break
            if sch is None:
                continue
            updates[gv] = sch.mod["main"].with_attr(SCHEDULED_ATTR, True).with_attr(SOURCE_ATTR, "default")
        mod = mod.clone()  # never edit the caller's module in place (IRModule.__setitem__ mutates)
        for gv, func in updates.items():
            mod[gv] = func
        return mod


def is_scheduled(func: tvm.ir.BaseFunc) -> bool:
    """True for a PrimFunc marked ``tirx.is_scheduled`` (by dlight, MetaSchedule or this pass)."""
    return (
        isinstance(func, tirx.PrimFunc)
        and func.attrs is not None
        and SCHEDULED_ATTR in func.attrs
        and bool(func.attrs[SCHEDULED_ATTR])
    )

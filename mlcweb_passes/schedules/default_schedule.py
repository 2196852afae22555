"""Default schedules: give every PrimFunc a schedule fit for its target without tuning.

Legalized TIR is a plain loop nest: on a GPU it does not even build (nothing is bound to threads),
and on the CPU it runs on one core with the reduction innermost. This pass schedules each PrimFunc
that is not already scheduled (``tirx.is_scheduled``) with

- GPU targets: our rules :class:`~.channels_last_norm.ChannelsLastNorm` (group norm over large
  channels-last activations, on CUDA, its pixels split across thread blocks),
  :class:`~.row_reduction.RowReduction` (group norm and other reductions with few long rows),
  :class:`~.short_row_reduction.ShortRowReduction` (layer norm and other norms over many short rows, a
  warp per row, on CUDA), :class:`~mlcweb_passes.cuda.tensor_core_matmul.TensorCoreMatmul` (float16
  GEMMs, matmuls and convolutions, on tensor cores, CUDA sm_70+) and
  :class:`~.skinny_matmul.SkinnyMatmul` (GEMMs of at most 8 rows, a warp per output column, on CUDA
  and WebGPU), :class:`~.narrow_output.NarrowOutput` (GEMMs and convolutions of at most 8 output
  columns, a warp per output row, on WebGPU),
  :class:`~mlcweb_passes.webgpu.gemm.WebGPUMatmul` (GEMMs and convolutions in large tiles, on WebGPU),
  then the ``tvm.s_tir.dlight`` default GPU rules (Matmul, GEMV, Reduction, GeneralReduction,
  Fallback), as ``relax.get_default_pipeline`` would;
- ``llvm``: :class:`~.cpu.CPUParallel`, a rule of ours that inlines elementwise producers, runs the
  spatial loops in parallel and, for matmul- and conv-shaped reductions, moves the reduction
  outside the contiguous output axis so LLVM can vectorise it.

Functions it schedules get the attribute ``mlcweb.schedule = "default"``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from .._relax import ModulePassBase
from .._tir import SCHEDULED_ATTR, SOURCE_ATTR
from ..cuda.tensor_core_matmul import TensorCoreMatmul
from ..targets import GpuFacts, gpu_facts, is_gpu_target
from ..webgpu.gemm import WebGPUMatmul, WebGPUTile
from .channels_last_norm import ChannelsLastNorm
from .cpu import CPUParallel
from .narrow_output import NarrowOutput
from .row_reduction import RowReduction
from .short_row_reduction import ShortRowReduction
from .skinny_matmul import SkinnyMatmul
from .vector_elementwise import VectorElementwise

log = logging.getLogger(__name__)

__all__ = ["DefaultSchedule", "default_rules", "is_scheduled"]


def default_rules(
    target: Target, gpu: GpuFacts | None = None, tiles: Mapping[str, WebGPUTile] | None = None
) -> list[dl.ScheduleRule]:
    """The rules :class:`DefaultSchedule` applies for ``target``, in priority order; GPU rules size their
    work for ``gpu`` (:func:`~mlcweb_passes.targets.gpu_facts` of the target when not given), WebGPU
    GEMMs take their tiles from the tile table ``tiles`` where it has their shape."""
    if is_gpu_target(target):
        facts = gpu or gpu_facts(target)
        return [
            ChannelsLastNorm(facts),
            RowReduction(fuse_below=10240),  # one kernel for short rows: results/*group_norm-2-one-kernel*
            ShortRowReduction(),
            TensorCoreMatmul(gpu=facts),
            SkinnyMatmul(),
            NarrowOutput(),
            WebGPUMatmul(tiles=tiles),
            dl.gpu.Matmul(),
            dl.gpu.GEMV(),
            dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(),
            VectorElementwise(),
            dl.gpu.Fallback(),
        ]
    if target.kind.name == "llvm":
        return [CPUParallel()]
    raise ValueError(f"no default schedule rules for target kind {target.kind.name!r}")


@tvm.transform.module_pass(opt_level=0, name="mlcweb.DefaultSchedule")
class DefaultSchedule(ModulePassBase):
    """Schedule every not-yet-scheduled PrimFunc with :func:`default_rules` for ``target``."""

    def __init__(
        self, target: Target | None = None, gpu: GpuFacts | None = None, tiles: Mapping[str, WebGPUTile] | None = None
    ) -> None:
        self.target = target
        self.gpu = gpu
        self.tiles = tiles

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        target = self.target or Target.current(allow_none=False)
        rules = default_rules(target, self.gpu, self.tiles)
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

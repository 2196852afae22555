"""Replace float16 GEMM kernels with Hopper ``wgmma`` kernels, generated from each fused PrimFunc.

The tensor-core schedules TVM 0.27 can express (WMMA, ``mma.sync``) leave Stable Diffusion's linear
layers and convolutions far below Hopper's peak. :class:`WgmmaGemm` rewrites every fused PrimFunc that
is one float16 GEMM plus an elementwise epilogue (what :mod:`.wgmma_plan` accepts) into a host function
launching a kernel of :mod:`.wgmma_source`, compiled for ``sm_90a`` by :mod:`.wgmma_compile` and attached
to the module as an external CUDA module (``external_mods``, linked by ``tvm.compile``). The PrimFunc
keeps its signature, so its ``call_tir`` callers, memory planning and CUDA graphs are unchanged.
"""

from __future__ import annotations

import logging

import tvm
from tvm import tirx

from .._relax import ModulePassBase
from .._tir import SCHEDULED_ATTR
from ..targets import gpu_facts, sm_version
from .wgmma_compile import compile_kernels, cuda_runtime, external_modules, launcher
from .wgmma_plan import UnsupportedGemmError, plan_kernel

__all__ = ["WgmmaGemm", "supports_wgmma"]

log = logging.getLogger(__name__)


def supports_wgmma(target: tvm.target.Target) -> bool:
    """Whether ``target`` runs the kernels: CUDA sm_90 (Hopper; wgmma is sm_90a only)."""
    return sm_version(target) == 90


@tvm.transform.module_pass(opt_level=0, name="mlcweb.WgmmaGemm")
class WgmmaGemm(ModulePassBase):
    """Every float16 GEMM PrimFunc the wgmma kernel can run becomes a launch of it (CUDA sm_90 only;
    other targets pass through). See the module docstring."""

    def __init__(self, sm_count: int | None = None) -> None:
        self.sm_count = sm_count  # None: gpu_facts(target)

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        target = tvm.target.Target.current(allow_none=True)
        if target is None or not supports_wgmma(target):
            return mod
        if not cuda_runtime():
            log.warning("this TVM has no CUDA runtime: the GEMMs keep their schedule rules, not wgmma kernels")
            return mod
        sms = self.sm_count or gpu_facts(target).sm_count
        kernels, launchers = [], {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or SCHEDULED_ATTR in func.attrs:
                continue
            try:
                kernel = plan_kernel(func, f"mlcweb_wgmma_{gv.name_hint}", sms)
            except UnsupportedGemmError as why:
                log.debug("%s stays with the schedule rules: %s", gv.name_hint, why)
                continue
            kernels.append(kernel)
            launchers[gv] = launcher(func, kernel)
        if not kernels:
            return mod
        log.info("wgmma: %d GEMM kernels", len(kernels))
        module = compile_kernels(kernels)
        result = tvm.IRModule(
            {gv: launchers.get(gv, func) for gv, func in mod.functions_items()},
            attrs=mod.attrs,
            global_infos=mod.global_infos,
        )
        return result.with_attr("external_mods", [*external_modules(result), module])

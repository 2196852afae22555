"""Operator fusion: lower Relax operators to TIR and fuse producer/consumer chains into one kernel.

Each Relax operator legalizes to its own PrimFunc; launched one by one, a UNet is thousands of tiny
kernels that each read and write their whole tensor. This pass runs the standard sequence

``LegalizeOps`` -> ``AnnotateTIROpPattern`` -> ``FoldConstant`` -> ``FuseOps`` -> ``FuseTIR``

so elementwise and broadcast consumers (bias add, activation, residual add, casts) are merged into the
kernel of the matmul, convolution or reduction they follow. Composite functions made by pattern fusion
(:class:`~mlcweb_passes.fuse_attention.FuseAttention`) are legalized and fused the same way, becoming one
PrimFunc each.
"""

from __future__ import annotations

import tvm
from tvm import relax

from .._relax import ModulePassBase

__all__ = ["FuseOperators", "count_kernels"]


@tvm.transform.module_pass(opt_level=0, name="mlcweb.FuseOperators")
class FuseOperators(ModulePassBase):
    """Legalize Relax ops to TIR and fuse them (``fuse_opt_level`` is FuseOps' level, -1 = context's)."""

    def __init__(self, fuse_opt_level: int = -1) -> None:
        self.fuse_opt_level = fuse_opt_level

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        seq = tvm.transform.Sequential(
            [
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(self.fuse_opt_level),
                relax.transform.FuseTIR(),
                relax.transform.DeadCodeElimination(),
            ]
        )
        return seq(mod)


def count_kernels(mod: tvm.IRModule) -> int:
    """Number of PrimFuncs (kernels after lowering) in ``mod``."""
    return sum(1 for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))

"""Softmax fusion: the casts and reshapes around a softmax become one kernel with it.

Mixed precision keeps softmax in float32 (a long sum of exponentials), so attention probabilities arrive
as ``astype(reshape(softmax(astype(reshape(scores16), f32))), f16)``. ``FuseOps`` fuses consumers into a
reduction but never producers, so the cast of the scores to float32 is a kernel of its own, and the
float32 copy of the ``seq x seq`` matrix is written and read back: in SD1.5's UNet at 64x64 latents that
is 1 GiB per attention.

This pass groups each such chain (casts and reshapes before the softmax, ``broadcast_to`` / reshapes /
casts after it) into one composite function (``Composite = "mlcweb.softmax"``), which
:class:`~mlcweb_passes.fuse_ops.FuseOperators` legalizes into one PrimFunc: float16 in, float32 inside,
float16 out. Run after :class:`~mlcweb_passes.fuse_attention.FuseAttention`, which takes whole attention
chains first.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import DFPattern, is_op, wildcard

from .._relax import ModulePassBase, maybe_followed

__all__ = ["SOFTMAX_COMPOSITE", "FuseSoftmax", "softmax_patterns"]

SOFTMAX_COMPOSITE = "mlcweb.softmax"


def softmax_patterns() -> list[tuple[str, DFPattern]]:
    """``[cast] [reshape] -> softmax -> [broadcast_to] [reshape] [cast]`` with a cast on at least one side."""
    scores = wildcard()
    before = is_op("relax.astype")(maybe_followed(scores, "relax.reshape"))
    after = maybe_followed(is_op("relax.nn.softmax")(before), "relax.broadcast_to", "relax.reshape")
    cast_both = is_op("relax.astype")(after)
    return [(SOFTMAX_COMPOSITE, cast_both)]


@tvm.transform.module_pass(opt_level=0, name="mlcweb.FuseSoftmax")
class FuseSoftmax(ModulePassBase):
    """Wrap every ``cast -> softmax -> cast`` chain (reshapes allowed between) into one composite function."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        result: tvm.IRModule = relax.transform.FuseOpsByPattern(
            softmax_patterns(), bind_constants=True, annotate_codegen=False
        )(mod)
        return result

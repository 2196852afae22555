"""Attention fusion: group scaled-dot-product attention into one fused operator.

``softmax(Q @ K^T * scale) @ V`` arrives from torch.export as two batched matmuls around a softmax,
with reshapes and broadcasts between them, and SDPA's math decomposition adds a guard that zeroes rows
that are entirely ``-inf``. ``FuseOps`` never puts two reductions in one group, so the attention
scores, the softmax and the weighted sum become separate kernels and the ``seq x seq`` score matrix is
written to and read back from memory several times.

This pass matches the whole pattern with ``FuseOpsByPattern`` and wraps each match into a composite
function (``Composite = "mlcweb.attention"``, ``Primitive``), which :class:`FuseOperators` later legalizes
and merges into a single PrimFunc, the unit a flash-attention schedule works on.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import DFPattern, is_const, is_op, wildcard

from ._base import ModulePassBase, maybe_followed

__all__ = ["ATTENTION_COMPOSITE", "FuseAttention", "attention_patterns"]

ATTENTION_COMPOSITE = "mlcweb.attention"


def _scores() -> tuple[DFPattern, DFPattern]:
    query, key = wildcard(), wildcard()
    scores = maybe_followed(is_op("relax.matmul")(query, key), "relax.reshape")
    scaled = scores | is_op("relax.multiply")(scores, is_const()) | is_op("relax.divide")(scores, is_const())
    scaled = maybe_followed(scaled, "relax.reshape")
    # An additive mask (causal or padding) may come before the softmax.
    masked = scaled | is_op("relax.add")(scaled, wildcard())
    return masked, is_op("relax.nn.softmax")(masked)


def attention_patterns() -> list[tuple[str, DFPattern]]:
    """The ``(name, pattern)`` pairs matched, most specific first."""
    value = wildcard()
    masked, probs = _scores()
    # torch's SDPA math path: rows whose scores are all -inf get zero weights instead of NaN.
    all_inf = is_op("relax.equal")(masked, is_const())
    keep = is_op("relax.logical_not")(all_inf)
    any_keep = is_op("relax.astype")(is_op("relax.max")(is_op("relax.astype")(keep)))
    guard = is_op("relax.logical_not")(any_keep)
    guarded = is_op("relax.where")(guard, is_op("relax.full_like")(probs, is_const()), probs)
    with_guard = is_op("relax.matmul")(maybe_followed(guarded, "relax.broadcast_to", "relax.reshape"), value)
    plain = is_op("relax.matmul")(maybe_followed(probs, "relax.broadcast_to", "relax.reshape"), value)
    return [(ATTENTION_COMPOSITE, with_guard), (ATTENTION_COMPOSITE, plain)]


@tvm.transform.module_pass(opt_level=0, name="mlcweb.FuseAttention")
class FuseAttention(ModulePassBase):
    """Wrap every ``matmul -> [scale] -> [mask] -> softmax -> matmul`` chain into one composite function."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return relax.transform.FuseOpsByPattern(attention_patterns(), bind_constants=True, annotate_codegen=False)(mod)

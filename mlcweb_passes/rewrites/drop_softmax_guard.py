"""Drop torch's "safe softmax" guard where no attention row can be entirely ``-inf``.

``torch.nn.functional.scaled_dot_product_attention`` exports (math path) as ``softmax(scores)`` followed
by a guard that gives zero weights to rows whose scores are all ``-inf`` (rows a mask removed entirely)::

    all_masked = logical_not(astype(max(astype(logical_not(equal(scores, -inf)), int8)), bool))
    probs = where(all_masked, full_like(softmax(scores), 0), softmax(scores))

The guard is a second pass over the ``seq x seq`` score matrix, a reduction, a compare and a select: in
SD1.5's UNet at 64x64 latents it costs more than the attention matmuls. A row can only be all ``-inf``
if some score is ``-inf``, and scores computed as a matmul of
finite queries and keys, optionally scaled by a constant, reshaped or cast, are finite. So where the
scores come from such a chain (no additive mask, which may hold ``-inf``), this pass replaces the guarded
result by ``softmax(scores)`` itself; dead-code elimination then removes the guard. With a mask the guard
is kept: it changes results there.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import GenericConst
from tvm.relax.expr_functor import PyExprMutator, mutator

from .._relax import Bindings, ModulePassBase, op_name, rewrite_and_clean

__all__ = ["DropSoftmaxGuard"]

log = logging.getLogger(__name__)

# Ops that keep a finite tensor finite (with a constant second operand where they take one).
_SHAPE_OR_CAST = {"relax.astype", "relax.reshape", "relax.permute_dims", "relax.broadcast_to"}
_BY_CONSTANT = {"relax.multiply", "relax.divide"}


class _Graph(Bindings):
    """Follow variables to the calls bound to them (within one function)."""

    def call(self, expr: Any, op: str) -> relax.Call | None:
        value = self.value(expr)
        return value if op_name(value) == op else None

    def strip_casts(self, expr: Any) -> Any:
        """``expr`` with its chain of ``astype`` producers removed (a var or call)."""
        return self.through(expr, ("relax.astype",))[1]

    def finite_scores(self, expr: Any) -> bool:
        """True when ``expr`` is a matmul seen through shape ops, casts and scaling by a finite constant."""
        value = self.value(expr)
        while True:
            name = op_name(value)
            if name == "relax.matmul":
                return True
            if name in _SHAPE_OR_CAST or (name in _BY_CONSTANT and _finite_constant(value.args[1])):
                value = self.value(value.args[0])
            elif name == "relax.multiply" and _finite_constant(value.args[0]):
                value = self.value(value.args[1])
            else:
                return False


def _constant(expr: Any) -> np.ndarray | None:
    if isinstance(expr, GenericConst):
        return np.asarray(expr.value.numpy())
    return None


def _finite_constant(expr: Any) -> bool:
    # A scale may arrive as astype(const) after mixed precision.
    while op_name(expr) == "relax.astype":
        expr = expr.args[0]
    value = _constant(expr)
    return value is not None and bool(np.isfinite(value).all())


def guarded_softmax(graph: _Graph, call: relax.Call) -> relax.Expr | None:
    """The ``softmax`` the guard ``call`` (a ``where``) wraps, or None if ``call`` is not that guard."""
    if op_name(call) != "relax.where" or len(call.args) != 3:
        return None
    cond, zeros, probs = call.args
    softmax = graph.call(probs, "relax.nn.softmax")
    fill = graph.call(zeros, "relax.full_like")
    if softmax is None or fill is None or not _is_zero(fill.args[1]):
        return None
    # cond = logical_not(astype(max(astype(logical_not(equal(s, -inf))))))
    chain = ["relax.logical_not", "relax.astype", "relax.max", "relax.astype", "relax.logical_not", "relax.equal"]
    node: Any = cond
    for op in chain:
        found = graph.call(node, op)
        if found is None:
            return None
        node = found
        if op != "relax.equal":
            node = found.args[0]
    value = _constant(node.args[1])
    if value is None or not (np.isneginf(value).all()):
        return None
    scores = graph.strip_casts(node.args[0])
    if not scores.same_as(graph.strip_casts(softmax.args[0])) or not graph.finite_scores(scores):
        return None
    return probs


def _is_zero(expr: Any) -> bool:
    value = _constant(expr)
    return value is not None and bool((value == 0).all())


@mutator
class _DropGuard(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.graph: _Graph | None = None
        self.dropped = 0

    def visit_function_(self, func: relax.Function) -> relax.Expr:
        self.graph = _Graph(func)
        return super().visit_function_(func)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if self.graph is not None:
            probs = guarded_softmax(self.graph, call)
            if probs is not None:
                self.dropped += 1
                return self.visit_expr(probs)
        return super().visit_call_(call)


@tvm.transform.module_pass(opt_level=0, name="mlcweb.DropSoftmaxGuard")
class DropSoftmaxGuard(ModulePassBase):
    """Replace ``where(all_rows_masked, 0, softmax(s))`` by ``softmax(s)`` where ``s`` cannot hold ``-inf``."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _DropGuard(mod)
        result = rewrite_and_clean(mod, rewriter)
        if rewriter.dropped:
            log.info("dropped %d softmax guards (scores cannot be -inf)", rewriter.dropped)
        return result

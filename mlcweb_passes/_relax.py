"""Helpers the Relax rewrites share: the pass base class, binding walks, mutators, op names."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import tvm
from tvm import relax, tirx
from tvm.relax.dpl import DFPattern, is_op, wildcard
from tvm.relax.expr_functor import PyExprMutator


class ModulePassBase:
    """Base of the ``@tvm.transform.module_pass`` classes of this package.

    The decorator turns each class into a ``tvm.transform.ModulePass`` whose instances are called on
    an IRModule; type checkers do not apply class decorators, so this declares the call for them.
    """

    if TYPE_CHECKING:

        def __call__(self, mod: tvm.IRModule) -> tvm.IRModule: ...


def rewrite_relax_functions(mod: tvm.IRModule, rewriter: Any) -> tvm.IRModule:
    """Run a ``PyExprMutator`` (built on ``mod``) over every Relax function of ``mod``; the new module."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    result: tvm.IRModule = rewriter.builder_.get()
    return result


def rewrite_and_clean(mod: tvm.IRModule, rewriter: Any) -> tvm.IRModule:
    """:func:`rewrite_relax_functions`, then drop the bindings the rewrite left unused."""
    result: tvm.IRModule = tvm.transform.Sequential(
        [relax.transform.CanonicalizeBindings(), relax.transform.DeadCodeElimination()]
    )(rewrite_relax_functions(mod, rewriter))
    return result


class Bindings:
    """Follows variables back to the values bound to them, within one Relax function."""

    def __init__(self, func: relax.Function) -> None:
        self.values = relax.analysis.get_var2val(func)

    def value(self, expr: Any) -> Any:
        """What ``expr`` is bound to, through chains of variables (``expr`` itself if unbound)."""
        while isinstance(expr, relax.Var) and expr in self.values:
            expr = self.values[expr]
        return expr

    def through(self, expr: Any, ops: tuple[str, ...]) -> tuple[Any, Any]:
        """Skip calls of ``ops`` (first argument) back from ``expr``: ``(expr reached, its value)``."""
        value = self.value(expr)
        while op_name(value) in ops:
            expr = value.args[0]
            value = self.value(expr)
        return expr, value


def use_counts(func: relax.Function) -> Counter[relax.Var]:
    """How many bindings of ``func`` (and its result) use each variable."""
    counts: Counter[relax.Var] = Counter()
    body = func.body
    for block in body.blocks:
        for binding in block.bindings:
            counts.update(relax.analysis.free_vars(binding.value))
    counts.update(relax.analysis.free_vars(body.body))
    return counts


class FunctionMutator(PyExprMutator):
    """A ``PyExprMutator`` that knows, in each Relax function it visits, what each variable is bound to
    (``bindings``) and how often it is used (``uses``), and counts the rewrites its subclass makes
    (``rewritten``). Subclasses are decorated with ``@mutator``; this base is not (TVM forbids
    inheriting from a decorated class)."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.bindings: Bindings | None = None
        self.uses: Counter[relax.Var] = Counter()
        self.rewritten = 0

    def visit_function_(self, func: relax.Function) -> relax.Expr:
        self.bindings, self.uses = Bindings(func), use_counts(func)
        self.prepare(func)
        return super().visit_function_(func)

    def prepare(self, func: relax.Function) -> None:
        """Called with each function before it is visited, once ``bindings`` and ``uses`` are set: where a
        subclass plans rewrites that need the whole function (the default does nothing)."""


# Ops that only move elements: a cast commutes with each of them.
LAYOUT_OPS = (
    "relax.reshape",
    "relax.permute_dims",
    "relax.broadcast_to",
    "relax.expand_dims",
    "relax.squeeze",
    "relax.flatten",
)


def static_shape(shape: Any) -> list[int] | None:
    """``shape`` (a Relax tensor type's) as ints, or None when it is unknown or has a symbolic dimension."""
    if shape is None or not all(isinstance(d, tirx.IntImm | int) for d in shape):
        return None
    return [int(d) for d in shape]


def op_name(expr: Any) -> str | None:
    """The name of the Relax operator ``expr`` calls, or None when it is not an operator call."""
    return str(expr.op.name) if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) else None


def maybe_followed(pattern: DFPattern, *ops: str) -> DFPattern:
    """``pattern`` optionally followed by each op of ``ops`` (shape ops torch.export inserts: a tensor and
    a shape argument)."""
    for op in ops:
        pattern = pattern | is_op(op)(pattern, wildcard())
    return pattern

"""Typing support shared by the pass classes."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.dpl import DFPattern, is_op, wildcard
from tvm.relax.expr_functor import PyExprMutator
from tvm.s_tir.dlight.analysis import SBlockInfo, normalize_prim_func
from tvm.s_tir.dlight.base import try_inline

GPU_KINDS = frozenset({"cuda", "rocm", "metal", "vulkan", "webgpu", "opencl"})


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


def inlined_blocks(func: tirx.PrimFunc) -> tuple[s_tir.Schedule, list[SBlockInfo]] | None:
    """A schedule of ``func`` with its blocks normalised and injective ones inlined (dlight's start), or
    None for a function dlight cannot normalise."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    return sch, try_inline(sch, infos)


def one_reduction(func: tirx.PrimFunc) -> tuple[s_tir.Schedule, list[SBlockInfo], SBlockInfo] | None:
    """For a function with one reduction and only elementwise blocks besides (a norm and its epilogue):
    :func:`inlined_blocks`' schedule, its blocks and the reduction; None for anything else."""
    normalized = inlined_blocks(func)
    if normalized is None:
        return None
    sch, infos = normalized
    reductions = [info for info in infos if info.is_reduction()]
    if len(reductions) != 1 or any(not (info.is_reduction() or info.is_injective()) for info in infos):
        return None
    return sch, infos, reductions[0]


def reduce_across_lanes(
    sch: s_tir.Schedule,
    block: s_tir.schedule.SBlockRV,
    at: s_tir.schedule.LoopRV,
    row_axes: int,
    lanes: int,
    scope: str,
) -> None:
    """Compute reduction ``block`` under loop ``at`` (its row's loop), its reduction loops strided over
    ``lanes`` threads of ``threadIdx.x`` (a cross-thread reduction), every output kept in ``scope``.
    ``row_axes``: the block's leading spatial axes, unit loops under ``at`` once it is computed there."""
    sch.compute_at(block, at, preserve_unit_loops=True)
    loops = sch.get_loops(block)
    depth = 1 + next(i for i, loop in enumerate(loops) if sch.get_sref(loop).same_as(sch.get_sref(at)))
    own = loops[depth + row_axes :]
    serial, lane = sch.split(sch.fuse(*own), factors=[None, lanes])
    sch.reorder(lane, serial)
    sch.bind(lane, "threadIdx.x")
    for index in range(len(sch.get(block).writes)):
        sch.set_scope(block, index, scope)


def uses_var(expr: tirx.PrimExpr, var: tirx.Var) -> bool:
    """True when ``var`` occurs in ``expr``."""
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def buffer_loads(e: Any) -> list[Any]:
    """Every buffer load in TIR expression ``e``, those in other loads' indices included."""
    if isinstance(e, tvm.ir.TensorLoad):
        return [e, *(x for i in e.indices for x in buffer_loads(i))]
    children = [getattr(e, f) for f in ("a", "b", "value", "condition", "true_value", "false_value") if hasattr(e, f)]
    children += list(e.args) if isinstance(e, tvm.ir.Call) else []
    return [x for c in children for x in buffer_loads(c)]

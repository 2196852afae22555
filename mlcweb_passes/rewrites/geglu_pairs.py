"""GEGLU in its projection's kernel: interleave the projection's value and gate columns so ``a * gelu(g)``
becomes an epilogue over neighbouring column pairs.

diffusers' ``GEGLU`` (every transformer block's feed-forward) projects to ``2F`` columns, splits them into
a value half ``a`` and a gate half ``g`` and returns ``a * gelu(g)``. Fused as TVM leaves it, the projection
writes all ``2F`` columns and a second kernel reads them back to write ``F``: in SD1.5's UNet at 512x512
the projection stores twice what the block needs, and a kernel reads it all back.

An epilogue cannot fuse the two halves: the value and gate of output column ``j`` are ``F`` columns apart,
computed by different thread blocks. This pass reorders the projection's output columns (by reordering
the rows of its ``[2F, K]`` weight, and its bias, which weight lifting then does once, offline) so that
value ``j`` is column ``2j`` and gate ``j`` column ``2j + 1``. It replaces

    h = matmul_nt(x, w) -> [casts, + bias ...] -> [reshape] -> split(2, last axis) -> a * gelu(g)

(``matmul_nt`` as :class:`~mlcweb_passes.LinearWeightLayout` writes linear layers) with one ``call_tir`` of
``out[..., j] = e(c[..., 2j]) * gelu(e(c[..., 2j + 1]))``, ``c = x @ interleave(w)^T`` and ``e`` the
chain of casts and per-column additions or products between the GEMM and the split, each with its vector
interleaved the same way. The values are the same; only the columns' order inside the kernel changes.
:class:`~mlcweb_passes.WgmmaGemm` runs the result as one GEMM whose epilogue combines the two
accumulators a thread holds for columns ``2j`` and ``2j + 1``.

Run it before weight lifting, after :class:`~mlcweb_passes.LinearWeightLayout`, on targets where
``WgmmaGemm`` takes the fused GEMM (CUDA sm_90): elsewhere the default schedules would see a GEMM with an
epilogue they do not tile well.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import mutator

from .._relax import FunctionMutator, ModulePassBase, op_name, rewrite_and_clean, static_shape
from .linear_weight_layout import NT_MATMUL_NAME, nt_matmul, nt_matmul_args

__all__ = ["GegluPairs", "interleave_halves"]

log = logging.getLogger(__name__)

SQRT_HALF = 0.7071067811865476


@dataclass(frozen=True)
class _Step:
    """One elementwise step between the GEMM and the split: a cast, or ``+`` / ``*`` by a column vector."""

    kind: str  # "cast", "add" or "multiply"
    dtype: str  # the step's result type
    vector: relax.Expr | None = None


@dataclass(frozen=True)
class _Geglu:
    x: relax.Expr
    weight: relax.Expr
    gemm_dtype: str
    steps: tuple[_Step, ...]  # in the order they apply


def interleave_halves(expr: relax.Expr, axis: int) -> relax.Expr:
    """``expr`` with the two halves of ``axis`` interleaved: element ``i`` of the first half goes to
    ``2i``, element ``i`` of the second to ``2i + 1`` (Relax ops, so weight lifting folds them)."""
    shape = static_shape(expr.ty.shape)
    if shape is None or shape[axis] % 2:
        raise ValueError(f"cannot interleave the halves of axis {axis} of {expr.ty}")
    axis %= len(shape)
    split = [*shape[:axis], 2, shape[axis] // 2, *shape[axis + 1 :]]
    perm = list(range(len(split)))
    perm[axis], perm[axis + 1] = axis + 1, axis
    return relax.op.reshape(relax.op.permute_dims(relax.op.reshape(expr, split), perm), shape)


def _is_column_vector(expr: relax.Expr, columns: int) -> bool:
    shape = static_shape(expr.ty.shape) if isinstance(expr.ty, relax.TensorType) else None
    return shape is not None and len(shape) >= 1 and shape[-1] == columns and all(d == 1 for d in shape[:-1])


@mutator
class _Rewriter(FunctionMutator):
    def _single_use(self, expr: relax.Expr) -> bool:
        return isinstance(expr, relax.Var) and self.uses[expr] == 1

    def _value(self, expr: relax.Expr) -> Any:
        return self.bindings.value(expr) if self.bindings is not None else expr

    def _halves(self, call: relax.Call) -> tuple[relax.Expr, relax.Expr] | None:
        """For ``multiply(a, gelu(g))`` (either order) with ``a, g = split(X, 2)`` along the last axis,
        each used only there: ``(X, the split)``."""
        if op_name(call) != "relax.multiply":
            return None
        for a, gelu in (call.args, call.args[::-1]):
            gelu_value = self._value(gelu)
            if op_name(gelu_value) != "relax.nn.gelu" or not self._single_use(gelu):
                continue
            a_value, g_value = self._value(a), self._value(gelu_value.args[0])
            if not (isinstance(a_value, relax.TupleGetItem) and isinstance(g_value, relax.TupleGetItem)):
                continue
            if (a_value.index, g_value.index) != (0, 1) or not a_value.tuple_value.same_as(g_value.tuple_value):
                continue
            if not (self._single_use(a) and self._single_use(gelu_value.args[0])):
                continue
            split = self._value(a_value.tuple_value)
            if op_name(split) == "relax.split" and self.uses[a_value.tuple_value] == 2:
                return split.args[0], split
        return None

    def _split_in_halves(self, split: relax.Call) -> bool:
        shape = static_shape(split.args[0].ty.shape)
        if shape is None or shape[-1] % 2 or int(split.attrs.axis) not in (-1, len(shape) - 1):
            return False
        sections = split.attrs.indices_or_sections
        if isinstance(sections, tirx.IntImm | int):
            return int(sections) == 2
        return [int(s) for s in sections] == [shape[-1] // 2]

    def _chain(self, expr: relax.Expr, columns: int) -> _Geglu | None:
        """Back from the split's input to ``matmul_nt(x, w)`` through casts, reshapes that keep the last
        axis, and column-vector additions or products, each result used only by the next."""
        steps: list[_Step] = []
        while True:
            if not self._single_use(expr):
                return None
            value = self._value(expr)
            name = op_name(value)
            if name == "relax.astype":
                steps.append(_Step("cast", str(value.attrs.dtype)))
                expr = value.args[0]
            elif name == "relax.reshape":
                shape = static_shape(value.args[0].ty.shape)
                if shape is None or shape[-1] != columns:
                    return None
                expr = value.args[0]
            elif name in ("relax.add", "relax.multiply"):
                lhs, rhs = value.args
                if _is_column_vector(lhs, columns) and not _is_column_vector(rhs, columns):
                    lhs, rhs = rhs, lhs
                elif not _is_column_vector(rhs, columns):
                    return None
                steps.append(_Step(name.split(".")[1], str(value.ty.dtype), rhs))
                expr = lhs
            elif (gemm := nt_matmul_args(value)) is not None:
                x, w = gemm  # LinearWeightLayout's matmul_nt, with ``columns`` rows in w
                w_shape, x_shape = static_shape(w.ty.shape), static_shape(x.ty.shape)
                if w_shape is None or x_shape is None or w_shape != [columns, x_shape[-1]]:
                    return None
                return _Geglu(x, w, str(value.ty.dtype), tuple(reversed(steps)))
            else:
                return None

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        found = self._halves(call)
        if found is not None:
            x_expr, split = found
            shape = static_shape(x_expr.ty.shape)
            geglu = self._chain(x_expr, shape[-1]) if shape is not None and self._split_in_halves(split) else None
            if geglu is not None:
                self.rewritten += 1
                return self._emit(geglu, call)
        return super().visit_call_(call)

    def _emit(self, geglu: _Geglu, call: relax.Call) -> relax.Expr:
        weight = self.builder_.emit(interleave_halves(self.visit_expr(geglu.weight), 0))
        vectors = [
            self.builder_.emit(interleave_halves(self.visit_expr(s.vector), -1))
            for s in geglu.steps
            if s.vector is not None
        ]
        out = self.builder_.call_te(
            _geglu_pairs,
            self.visit_expr(geglu.x),
            weight,
            vectors,
            geglu.gemm_dtype,
            [(s.kind, s.dtype) for s in geglu.steps],
            primfunc_name_hint=f"{NT_MATMUL_NAME}_geglu",
        )
        return relax.op.reshape(self.builder_.emit(out), call.ty.shape)


def _geglu_pairs(
    x: te.Tensor, w: te.Tensor, vectors: list[te.Tensor], gemm_dtype: str, steps: list[tuple[str, str]]
) -> te.Tensor:
    """``out[..., j] = e(c[..., 2j]) * gelu(e(c[..., 2j + 1]))`` with ``c = x @ w^T`` (``w`` interleaved)
    and ``e`` the ``steps`` (casts, and ``+`` / ``*`` by the interleaved column ``vectors``), as Relax's
    legalization writes gelu: ``g * (0.5 + erf(g / sqrt(2)) * 0.5)``."""
    c = nt_matmul(x, w, gemm_dtype)

    def column(index: tuple[Any, ...], n: Any) -> Any:
        v = c[(*index, n)]
        it = iter(vectors)
        for kind, dtype in steps:
            if kind == "cast":
                v = v.astype(dtype)
                continue
            vec = next(it)
            operand = vec[(*[0] * (len(vec.shape) - 1), n)].astype(dtype)
            v = v + operand if kind == "add" else v * operand
        return v

    def pair(*i: Any) -> Any:
        a, g = column(i[:-1], 2 * i[-1]), column(i[:-1], 2 * i[-1] + 1)
        dtype = str(g.ty.dtype)
        half = tirx.const(0.5, dtype)
        return a * (g * (half + tirx.erf(g * tirx.const(SQRT_HALF, dtype)) * half))

    return te.compute((*c.shape[:-1], c.shape[-1] // 2), pair, name="geglu")


@tvm.transform.module_pass(opt_level=0, name="mlcweb.GegluPairs")
class GegluPairs(ModulePassBase):
    """Rewrite ``a * gelu(g)`` of the halves of a ``matmul_nt`` projection into one GEMM over interleaved
    weight rows whose epilogue combines neighbouring columns (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        result = rewrite_and_clean(mod, rewriter)
        if rewriter.rewritten:
            log.info("%d GEGLUs became column-pair epilogues of their projections", rewriter.rewritten)
        return result

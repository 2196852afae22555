"""Attention projections of one input as one GEMM: concatenate their weights, project once, split.

Self-attention projects the same input three times (``to_q``, ``to_k``, ``to_v``), and every
cross-attention of a UNet projects the same text embeddings twice (``to_k``, ``to_v``). In SD1.5's UNet
those GEMMs are short or thin and fill about one wave of a large GPU, so most of each kernel is its start
and its end (the 154-row cross-attention projections are 32 kernels a step). One GEMM over the
concatenated weights does the same work in as many times the blocks.

This pass groups the :class:`~mlcweb_passes.LinearWeightLayout` ``matmul_nt`` calls of one function whose
inputs are the same computation (the same variable through the same casts and reshapes), whose weights are
parameters (possibly cast) of one ``[N, K]`` shape, and whose outputs are reshaped to attention heads of
at most ``MAX_HEAD_DIM`` (what :class:`~mlcweb_passes.FlashAttention` takes). Each group of two or more
becomes one ``matmul_nt(x, concat(weights))`` and a ``split``, its parts in the order the projections
were bound. When every part was cast to the same type (float16 activations after a float32 GEMM), the
cast moves before the split, into the GEMM's epilogue. Run it before weight lifting, so the concatenation
is done once, to the weights.

:class:`~mlcweb_passes.FlashAttention` reads each part where the merged GEMM wrote it
(``flash_attention_kernel(views=...)``): a self-attention's Q, K and V, and the cross-attentions' K and V
(one group per width: ten projections at each of SD1.5's levels), so the splits are never computed. A
split that something else reads is an ordinary copy.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from .._relax import Bindings, FunctionMutator, ModulePassBase, op_name, rewrite_and_clean, static_shape
from ..cuda.flash_kernel import MAX_HEAD_DIM
from .linear_weight_layout import NT_MATMUL_NAME, nt_matmul, nt_matmul_args

__all__ = ["MergeProjections"]

log = logging.getLogger(__name__)

_SAME_VALUE_OPS = ("relax.astype", "relax.reshape")


def _projection(bindings: Bindings, value: Any, func: relax.Function) -> Any:
    """A grouping key for a ``matmul_nt(x, w)`` call with ``w`` a (cast) parameter: x's computation, the
    weight's shape and dtype, the output dtype; None for anything else."""
    gemm = nt_matmul_args(value)
    if gemm is None or len(value.ty.shape) < 2:
        return None
    x, w = gemm
    root, _ = _through_casts(bindings, w)
    shape = static_shape(w.ty.shape)
    if not any(root.same_as(p) for p in func.params) or shape is None or len(shape) != 2:
        return None
    return (_source(bindings, x), tuple(shape), str(w.ty.dtype), str(value.ty.dtype))


def _through_casts(bindings: Bindings, expr: relax.Expr) -> tuple[relax.Expr, list[str]]:
    """``expr`` followed back through ``astype``: what is cast, and the casts' dtypes, outermost first."""
    casts = []
    value = bindings.value(expr)
    while op_name(value) == "relax.astype":
        casts.append(str(value.attrs.dtype))
        expr = value.args[0]
        value = bindings.value(expr)
    return expr, casts


def _source(bindings: Bindings, x: relax.Expr) -> Any:
    """x as (the variable it is computed from, the casts and reshapes on the way): equal for the three
    projections' inputs, which torch.export computes three times."""
    ops: list[tuple[str, str]] = []
    value = bindings.value(x)
    while op_name(value) in _SAME_VALUE_OPS:
        ops.append((op_name(value) or "", str(value.ty)))
        x = value.args[0]
        value = bindings.value(x)
    return (x, tuple(ops))


@mutator
class _Rewriter(FunctionMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.groups: list[list[tuple[relax.Var, relax.Call]]] = []
        self.parts: dict[relax.Call, tuple[int, int]] = {}  # projection -> (group, position)
        self.merged: dict[int, relax.Var] = {}  # group -> its split
        self.users: dict[relax.Var, list[tuple[relax.Var, Any]]] = {}  # var -> the bindings that use it

    def prepare(self, func: relax.Function) -> None:
        bindings, uses = self.bindings, self.uses
        assert bindings is not None  # set by FunctionMutator.visit_function_
        self.groups, self.parts, self.merged, self.users = [], {}, {}, defaultdict(list)
        candidates: dict[Any, list[tuple[relax.Var, relax.Call]]] = defaultdict(list)
        for block in func.body.blocks:
            for binding in block.bindings:
                value = binding.value
                if isinstance(value, relax.Call):
                    for arg in value.args:
                        if isinstance(arg, relax.Var):
                            self.users[arg].append((binding.var, value))
                key = _projection(bindings, value, func)
                if key is not None:
                    candidates[key].append((binding.var, value))
        for group in candidates.values():
            if len(group) < 2 or not all(self._heads(var, call, uses) for var, call in group):
                continue
            for position, (_, call) in enumerate(group):
                self.parts[call] = (len(self.groups), position)
            self.groups.append(group)

    def _heads(self, var: relax.Var, call: relax.Call, uses: Any) -> bool:
        """Whether the projection's output reaches, through single-use casts and reshapes, a reshape to
        ``[..., H, D]`` with ``H * D`` its columns and ``D`` at most :data:`MAX_HEAD_DIM`."""
        columns = int(call.ty.shape[-1])
        while uses[var] == 1 and len(self.users[var]) == 1:
            var, user = self.users[var][0]
            if op_name(user) not in _SAME_VALUE_OPS:
                return False
            shape = static_shape(user.ty.shape)
            if shape is not None and len(shape) >= 2 and shape[-1] * shape[-2] == columns and shape[-2] > 1:
                return shape[-1] <= MAX_HEAD_DIM
        return False

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        part = self.parts.get(call)
        if part is None:
            return super().visit_call_(call)
        group, position = part
        if group not in self.merged:
            self.merged[group] = self._merge(self.groups[group])
            self.rewritten += 1
        part_value = relax.TupleGetItem(self.merged[group], position)
        # split after the narrowing cast every part had (see _merge): widen back, a round trip that
        # HoistNarrowingCasts removes
        return relax.op.astype(part_value, str(call.ty.dtype)) if part_value.ty.dtype != call.ty.dtype else part_value

    def _narrowing(self, group: list[tuple[relax.Var, relax.Call]]) -> str | None:
        """The dtype every projection's output is cast to by its only user, else None."""
        dtypes = set()
        for var, _ in group:
            users = self.users[var]
            if len(users) != 1 or op_name(users[0][1]) != "relax.astype":
                return None
            dtypes.add(str(users[0][1].attrs.dtype))
        return dtypes.pop() if len(dtypes) == 1 else None

    def _merge(self, group: list[tuple[relax.Var, relax.Call]]) -> relax.Var:
        """At the first projection: the concatenated weight (rebuilt from the parameters, which every
        binding can see), one ``matmul_nt`` and the split; when every part is cast to the same dtype (the
        float16 activations after a float32 GEMM), the split is of the cast, so the GEMM's epilogue casts
        and a split that is computed copies half the bytes."""
        weights = []
        for _, call in group:
            root, casts = _through_casts(self.bindings, call.args[1].fields[1])  # type: ignore[arg-type]
            rebuilt = self.visit_expr(root)
            for dtype in reversed(casts):
                rebuilt = relax.op.astype(rebuilt, dtype)
            weights.append(rebuilt)
        weight = self.builder_.emit(relax.op.concat(weights, axis=0))
        first = group[0][1]
        x = self.visit_expr(first.args[1].fields[0])
        out = self.builder_.emit(
            self.builder_.call_te(nt_matmul, x, weight, str(first.ty.dtype), primfunc_name_hint=NT_MATMUL_NAME)
        )
        narrow = self._narrowing(group)
        if narrow is not None:
            out = self.builder_.emit(relax.op.astype(out, narrow))
        n = int(first.ty.shape[-1])
        return self.builder_.emit(relax.op.split(out, [n * i for i in range(1, len(group))], axis=-1))


@tvm.transform.module_pass(opt_level=0, name="mlcweb.MergeProjections")
class MergeProjections(ModulePassBase):
    """Merge the attention projections of one input (a self-attention's Q, K, V; the cross-attentions' K
    and V of one width) into one GEMM over the concatenated weights and a split (see the module
    docstring). Run before weight lifting."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        result = rewrite_and_clean(mod, rewriter)
        if rewriter.rewritten:
            log.info("%d groups of attention projections became one GEMM each", rewriter.rewritten)
        return result

"""A transpose undone by the next transpose, with only casts between them, is no transpose at all.

:class:`~mlcweb_passes.ConvLayout` converts each convolution to channels last by wrapping it in
``permute_dims``: NCHW -> NHWC before, NHWC -> NCHW after. Between two layers whose layout is already
channels last, the pair meets head to tail: ``permute_dims(astype(permute_dims(x, [0, 3, 1, 2])),
[0, 2, 3, 1])``. SD's transformer blocks end that way (the residual ``x + ff(x)`` in NHWC, the
reshape to an image, then ``proj_out``'s NCHW -> NHWC), and TVM leaves both transposes in the fused
kernel of the residual add: a strided read and write of the whole activation per block, for nothing.

This pass rewrites ``permute_dims(c_n(...c_1(permute_dims(x, p))...), q)`` whose permutations compose
to the identity (``p[q[i]] == i``) and whose ``c_i`` are all ``astype``: the casts are applied to ``x``
directly, and a cast that only widens and the cast back to the original dtype after it (``float16 ->
float32 -> float16``, exact) are dropped. The values are unchanged. A transpose that other bindings
still read stays for them.
"""

from __future__ import annotations

import logging
from typing import Any

import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from .._relax import FunctionMutator, ModulePassBase, op_name, rewrite_and_clean

__all__ = ["CancelTransposes"]

log = logging.getLogger(__name__)

# dtype -> the dtypes that hold every value of it exactly (a cast there and back is the identity)
_WIDER = {
    "float16": ("float32", "float64"),
    "bfloat16": ("float32", "float64"),
    "float32": ("float64",),
}


def _axes(call: relax.Call) -> list[int] | None:
    """The permutation of a ``permute_dims`` call (its axes, or reversed where it has none)."""
    ndim = call.args[0].ty.ndim
    if ndim < 0:
        return None
    axes = call.attrs.axes
    return list(range(ndim))[::-1] if axes is None else [int(a) for a in axes]


def _without_round_trips(start: str, casts: list[str]) -> list[str]:
    """``casts`` (dtypes, applied in order to a ``start`` tensor) less each widening cast that the next
    cast undoes."""
    kept: list[str] = []
    for dtype in casts:
        before = kept[-2] if len(kept) >= 2 else start
        if kept and dtype == before and kept[-1] in _WIDER.get(before, ()):
            kept.pop()
            continue
        kept.append(dtype)
    if kept and kept[-1] == (kept[-2] if len(kept) >= 2 else start):
        kept.pop()  # a last cast to the dtype the tensor already has
    return kept


@mutator
class _Cancel(FunctionMutator):
    def visit_call_(self, op: relax.Call) -> relax.Expr:
        call = super().visit_call_(op)
        if op_name(call) != "relax.permute_dims" or self.bindings is None:
            return call
        inside, casts = self._casts(call.args[0])
        value = self.bindings.value(inside)
        if op_name(value) != "relax.permute_dims":
            return call
        outer, inner = _axes(call), _axes(value)
        if outer is None or inner is None or any(inner[q] != i for i, q in enumerate(outer)):
            return call
        source = value.args[0]
        # casts before the first transpose may make a round trip with those after the second
        root, before = self._casts(source)
        from_root = _without_round_trips(str(root.ty.dtype), before + casts)
        from_source = _without_round_trips(str(source.ty.dtype), casts)
        result: Any = root if len(from_root) <= len(from_source) else source
        for dtype in from_root if result is root else from_source:
            result = self.builder_.emit(relax.op.astype(result, dtype))
        self.rewritten += 1
        return result

    def _casts(self, expr: Any) -> tuple[Any, list[str]]:
        """``(what expr casts, the dtypes of its chain of astype in the order they apply)``."""
        assert self.bindings is not None
        dtypes: list[str] = []
        value = self.bindings.value(expr)
        while op_name(value) == "relax.astype":
            dtypes.insert(0, str(value.attrs.dtype))
            expr, value = value.args[0], self.bindings.value(value.args[0])
        return expr, dtypes


@tvm.transform.module_pass(opt_level=0, name="mlcweb.CancelTransposes")
class CancelTransposes(ModulePassBase):
    """Transposes undone by the next one, casts between (see the module docstring), become the casts."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Cancel(mod)
        result = rewrite_and_clean(mod, rewriter)
        if rewriter.rewritten:
            log.info("%d transpose pairs that undo each other dropped", rewriter.rewritten)
        return result

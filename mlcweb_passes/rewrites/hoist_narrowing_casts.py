"""Hoist narrowing casts above layout ops, so that the producer writes the narrow type and the layout op
moves half the bytes, or none.

Mixed precision leaves chains like these between kernels (SD1.5's UNet, per transformer block):

- ``astype(reshape(astype(layer_norm(x), float32)), float16)``: the norm's float16 output is widened,
  reshaped in float32 and narrowed back. Legalized and fused, that is a norm kernel writing float32
  and a second kernel reading it only to reshape and cast it (45 such pairs per UNet step);
- ``astype(reshape(conv2d(...) + bias), float16)``: the convolution writes float32 that a separate
  reshape-and-cast kernel narrows. Fusion cannot put the cast into the convolution's epilogue, because
  a reshape (injective, not elementwise) stands between them;
- ``broadcast_to(x, x.shape)`` and ``reshape(reshape(x))``: pure copies once fused into a kernel (the
  attention heads' split and merge: 128 copy kernels per step), where a single reshape would have
  become a view (``RewriteDataflowReshape``).

A cast commutes with any op that only moves elements (``reshape``, ``permute_dims``, ``broadcast_to``,
``expand_dims``, ``squeeze``, ``flatten``), so this pass rewrites, exactly:

1. ``astype(L(v), narrow)`` -> ``L(astype(v, narrow))`` when the cast narrows a float type and each step
   of the layout chain ``L`` has no other user. The cast now follows ``v``'s producer directly, and
   fusion puts it in that kernel's epilogue;
2. ``astype(astype(x, wide), x.dtype)`` -> ``x`` when the inner cast widens a float type (the value
   round-trips exactly);
3. ``broadcast_to(x, s)`` -> ``x`` when ``x`` already has the static shape ``s``;

then runs TVM's ``RemoveRedundantReshape`` (``reshape(reshape(x))`` -> one reshape, same-shape reshapes
dropped) and drops the bindings left unused. Values are unchanged bit for bit.
"""

from __future__ import annotations

import logging
from typing import Any

import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from .._relax import LAYOUT_OPS, FunctionMutator, ModulePassBase, op_name, rewrite_relax_functions, static_shape

__all__ = ["HoistNarrowingCasts"]

log = logging.getLogger(__name__)


def _float_bits(dtype: str) -> int:
    """Bits of a float dtype; 0 for other dtypes."""
    t = tvm.DataType(dtype)
    return int(t.bits) if t.type_code == tvm.DataTypeCode.FLOAT and t.lanes == 1 else 0


def _narrows(src: str, dst: str) -> bool:
    return 0 < _float_bits(dst) < _float_bits(src)


@mutator
class _Rewriter(FunctionMutator):
    def _round_trip(self, expr: Any, dtype: str) -> Any:
        """``x`` when ``expr`` is bound to ``astype(x, wider float)`` with ``x`` of ``dtype``, else None."""
        assert self.bindings is not None
        value = self.bindings.value(expr)
        if op_name(value) == "relax.astype":
            inner = value.args[0]
            if str(inner.ty.dtype) == dtype and _narrows(str(value.ty.dtype), dtype):
                return inner
        return None

    def _layout_chain(self, expr: Any) -> tuple[Any, list[relax.Call]]:
        """Walk back from ``expr`` through layout ops whose results have one user: the tensor reached,
        and the layout calls walked, last first."""
        assert self.bindings is not None
        chain: list[relax.Call] = []
        while isinstance(expr, relax.DataflowVar) and self.uses[expr] == 1:
            value = self.bindings.value(expr)
            if op_name(value) not in LAYOUT_OPS:
                break
            chain.append(value)
            expr = value.args[0]
        return expr, chain

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        name = op_name(call)
        if self.bindings is None or name not in ("relax.astype", "relax.broadcast_to"):
            return super().visit_call_(call)
        source = call.args[0]
        if name == "relax.broadcast_to":
            shape = static_shape(source.ty.shape)
            if shape is not None and shape == static_shape(call.ty.shape):
                self.rewritten += 1
                return self.visit_expr(source)
            return super().visit_call_(call)
        dtype = str(call.ty.dtype)
        if not _narrows(str(source.ty.dtype), dtype):
            return super().visit_call_(call)
        base, chain = self._layout_chain(source)
        original = self._round_trip(base, dtype)
        if not chain and original is None:
            return super().visit_call_(call)
        self.rewritten += 1
        if original is not None:
            result = self.visit_expr(original)
        else:
            result = self.builder_.emit(relax.op.astype(self.visit_expr(base), dtype))
        for i, layout in enumerate(reversed(chain)):
            rest = [self.visit_expr(a) for a in layout.args[1:]]
            moved = relax.Call(layout.op, [result, *rest], layout.attrs)
            result = moved if i == len(chain) - 1 else self.builder_.emit(moved)
        return result


@tvm.transform.module_pass(opt_level=0, name="mlcweb.HoistNarrowingCasts")
class HoistNarrowingCasts(ModulePassBase):
    """Move float-narrowing casts above layout-only ops, fold widen-then-narrow round trips, drop
    same-shape ``broadcast_to``s and merge consecutive reshapes (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        rewritten = rewrite_relax_functions(mod, rewriter)
        if rewriter.rewritten:
            log.info("%d casts hoisted, round trips or same-shape broadcasts removed", rewriter.rewritten)
        # One dead-code pass after both rewrites: ours and the reshape merge leave unused bindings.
        cleaned: tvm.IRModule = tvm.transform.Sequential(
            [
                relax.transform.CanonicalizeBindings(),
                relax.transform.RemoveRedundantReshape(),
                relax.transform.DeadCodeElimination(),
            ]
        )(rewritten)
        return cleaned

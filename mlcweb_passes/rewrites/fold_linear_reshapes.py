"""A linear layer whose output feeds a residual add multiplies the tokens in their own shape.

torch.export writes ``nn.Linear`` on a ``[B, S, K]`` input as ``reshape`` to ``[B*S, K]``, ``matmul``
(+ bias) and ``reshape`` back to ``[B, S, N]``. Where a residual add follows (a transformer block's
feed-forward output, SD2.1's ``proj_out``), the reshape between the GEMM and the add stops fusion: the
add, its casts and the reshapes become a kernel of their own that rereads the GEMM's output (16 a step in
SD1.5's UNet, 9-20 us each through Dawn on an H100, twentieth run), instead of an epilogue of the GEMM.

This pass rewrites ``add(reshape(add?(matmul(reshape(x, [M, K]), w), bias), x.shape[:-1] + [N]), r)``
(either operand order of either add, ``w`` two-dimensional, ``bias`` a vector) as ``add(add?(matmul(x, w),
bias), r)``: the same products in the same order, so the values are unchanged. It runs on the imported
graph, before mixed precision and :class:`~mlcweb_passes.LinearWeightLayout` (which writes the GEMM for
any number of leading axes). GEMMs whose result has another use, and linears without a residual add
after them (attention projections that :class:`~mlcweb_passes.MergeProjections` merges), are left as
they are.
"""

from __future__ import annotations

import logging
from typing import Any

import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from .._relax import FunctionMutator, ModulePassBase, op_name, rewrite_and_clean, static_shape

__all__ = ["FoldLinearReshapes"]

log = logging.getLogger(__name__)


@mutator
class _Fold(FunctionMutator):
    def visit_call_(self, op: relax.Call) -> relax.Expr:
        call = super().visit_call_(op)
        if op_name(call) != "relax.add" or self.bindings is None:
            return call
        for mine in (0, 1):
            folded = self._linear(call.args[mine], call.args[1 - mine])
            if folded is not None:
                self.rewritten += 1
                args = [folded, call.args[1]] if mine == 0 else [call.args[0], folded]
                return relax.op.add(*args)
        return call

    def _once(self, var: Any) -> bool:
        return isinstance(var, relax.Var) and self.uses[var] == 1

    def _linear(self, operand: Any, residual: Any) -> relax.Expr | None:
        """The linear behind ``operand`` (a reshape of its flattened output) in its input's shape, or None."""
        assert self.bindings is not None
        back = self.bindings.value(operand)
        want = static_shape(operand.ty.shape) if op_name(back) == "relax.reshape" else None
        if want is None or static_shape(residual.ty.shape) != want or not self._once(operand):
            return None
        flat, bias, bias_first = back.args[0], None, False
        value = self.bindings.value(flat)
        if op_name(value) == "relax.add" and self._once(flat):
            for position in (0, 1):
                vector = value.args[position]
                if static_shape(vector.ty.shape) == want[-1:]:
                    bias, bias_first, flat = vector, position == 0, value.args[1 - position]
                    value = self.bindings.value(flat)
                    break
        if op_name(value) != "relax.matmul" or not self._once(flat):
            return None
        lhs, weight = value.args
        source = self.bindings.value(lhs)
        if op_name(source) != "relax.reshape" or static_shape(weight.ty.shape) is None or weight.ty.ndim != 2:
            return None
        tokens = source.args[0]
        shape = static_shape(tokens.ty.shape)
        if shape is None or shape[:-1] != want[:-1] or len(static_shape(lhs.ty.shape) or []) != 2:
            return None
        result: relax.Expr = self.builder_.emit(relax.Call(value.op, [tokens, weight], value.attrs))
        if bias is not None:
            result = self.builder_.emit(relax.op.add(bias, result) if bias_first else relax.op.add(result, bias))
        return result


@tvm.transform.module_pass(opt_level=0, name="mlcweb.FoldLinearReshapes")
class FoldLinearReshapes(ModulePassBase):
    """Linears before a residual add multiply in their input's shape (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Fold(mod)
        result = rewrite_and_clean(mod, rewriter)
        if rewriter.rewritten:
            log.info("%d linears before residual adds no longer flatten their tokens", rewriter.rewritten)
        return result

"""Infinite float constants rewritten as finite ones, for targets whose kernels cannot spell infinity (WebGPU).

WGSL has no literal for infinity; TVM's WebGPU code generator prints a float ``-inf`` constant as
``-inff``, which the browser rejects ("unresolved value 'inff'"). Traced models hold such constants:
torch SDPA's guard compares the attention scores with ``-inf`` (``equal(scores, -inf)``) to find rows
that are masked out entirely, and attention masks fill with ``-inf``.

This pass rewrites, in every Relax function:

- comparisons with a scalar infinity into exact comparisons with the largest finite value of the dtype:
  ``x == -inf`` becomes ``x < -max``, ``x == inf`` becomes ``x > max``, and ``!=`` the complements
  (for IEEE floats only an infinity lies beyond ``max``, so the result is the same for every x);
- any other infinity in a float constant into ``+-max`` of its dtype. This is the usual mask fill value
  (``softmax`` gives the same zeros), but not identical to infinity in general arithmetic, so the pass
  logs how many constants it changed this way.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import GenericConst
from tvm.relax.expr_functor import PyExprMutator, mutator

from .._relax import ModulePassBase, rewrite_relax_functions

__all__ = ["FiniteFloatLiterals"]

log = logging.getLogger(__name__)

# (op, sign of the infinity) -> (replacement op, sign of the finite bound)
_COMPARISONS = {
    ("relax.equal", -1): ("relax.less", -1),
    ("relax.equal", 1): ("relax.greater", 1),
    ("relax.not_equal", -1): ("relax.greater_equal", -1),
    ("relax.not_equal", 1): ("relax.less_equal", 1),
}


def _scalar_infinity(expr: relax.Expr) -> tuple[int, str] | None:
    """(sign, dtype) when ``expr`` is a constant holding one infinite float, else None."""
    if not isinstance(expr, GenericConst) or not isinstance(expr.value, tvm.runtime.Tensor):
        return None
    value = expr.value.numpy()
    if value.size != 1 or value.dtype.kind != "f" or not np.isinf(value).all():
        return None
    return (1 if float(value.reshape(-1)[0]) > 0 else -1), str(value.dtype)


@mutator
class _Finite(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.approximated = 0

    def visit_call_(self, op: relax.Call) -> relax.Expr:
        if isinstance(op.op, tvm.ir.Op) and len(op.args) == 2:
            for lhs, rhs in ((0, 1), (1, 0)):
                inf = _scalar_infinity(op.args[rhs])
                if inf is None or (op.op.name, inf[0]) not in _COMPARISONS:
                    continue
                # == and != are symmetric, so the other operand goes on the left either way.
                new_op, bound_sign = _COMPARISONS[(op.op.name, inf[0])]
                bound = relax.const(bound_sign * np.finfo(inf[1]).max, inf[1])
                other = self.visit_expr(op.args[lhs])
                return relax.Call(tvm.ir.Op.get(new_op), [other, bound])
        return super().visit_call_(op)

    def visit_generic_const_(self, op: GenericConst) -> relax.Expr:
        if not isinstance(op.value, tvm.runtime.Tensor):
            return op
        value = op.value.numpy()
        if value.dtype.kind != "f" or not np.isinf(value).any():
            return op
        self.approximated += 1
        big = np.finfo(value.dtype).max
        return relax.const(np.where(np.isinf(value), np.sign(value) * big, value).astype(value.dtype), str(value.dtype))


@tvm.transform.module_pass(opt_level=0, name="mlcweb.FiniteFloatLiterals")
class FiniteFloatLiterals(ModulePassBase):
    """Rewrite infinite float constants as finite ones (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Finite(mod)
        result = rewrite_relax_functions(mod, rewriter)
        if rewriter.approximated:
            log.info("replaced infinity by the largest finite value in %d constants", rewriter.approximated)
        return result

"""Cumulative sums of boolean tensors count in int32, as PyTorch's do (in int64).

``torch.cumsum`` of a ``bool`` tensor returns integers: a running count of the true elements (GPT-2's
position ids from its attention mask). TVM's importer keeps the result ``bool``, which no code
generator can add (LLVM: "Check failed: t.MatchesCode(kDLFloat)"), and which would lose the counts
anyway. This pass casts the input to ``int32`` and sums in ``int32`` (int64 is what PyTorch returns;
WGSL has no 64-bit integers, and a count of elements fits); everything downstream is re-inferred, so a
comparison of two counts compares the counts.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .._relax import ModulePassBase, op_name, rewrite_relax_functions

__all__ = ["IntegerCumsum"]

log = logging.getLogger(__name__)


@mutator
class _Count(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.rewritten = 0

    def visit_call_(self, op: relax.Call) -> relax.Expr:
        call = super().visit_call_(op)
        if op_name(call) != "relax.cumsum":
            return call
        source = call.args[0].ty
        if not isinstance(source, relax.TensorType) or str(source.dtype) != "bool":
            return call
        dtype = call.attrs.dtype
        if dtype is not None and str(dtype) not in ("", "bool"):
            return call
        self.rewritten += 1
        counts = relax.op.astype(call.args[0], "int32")
        axis = call.attrs.axis
        return relax.op.cumsum(counts, None if axis is None else int(axis), "int32", bool(call.attrs.exclusive))


@tvm.transform.module_pass(opt_level=0, name="mlcweb.IntegerCumsum")
class IntegerCumsum(ModulePassBase):
    """``cumsum`` of a boolean tensor counts in int32 (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Count(mod)
        result = rewrite_relax_functions(mod, rewriter)
        if rewriter.rewritten:
            log.info("%d boolean cumulative sums count in int32", rewriter.rewritten)
        return result

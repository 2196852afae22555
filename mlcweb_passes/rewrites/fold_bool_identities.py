"""Masks combined with a constant ``True`` (``x & True``, ``x | False``) are the mask itself.

PyTorch builds attention masks from pieces, and some are constant: transformers' causal mask starts from
``torch.full((), True)`` and ``&``s the real conditions onto it. TVM folds that scalar into a boolean
constant tensor, which the fused kernel then takes as a buffer argument, and boolean buffers are 8-bit:
WGSL has no 8-bit type, so the WebGPU shader does not compile ("'i8' type used without ... extension").
This pass drops the identity: ``and`` with a true scalar, ``or`` with a false one, gives the other
operand wherever that operand already has the result's shape and type. Exact.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import GenericConst
from tvm.relax.expr_functor import mutator

from .._relax import FunctionMutator, ModulePassBase, op_name, rewrite_and_clean, static_shape

__all__ = ["FoldBoolIdentities"]

log = logging.getLogger(__name__)

_IDENTITY = {  # op -> the scalar value that leaves the other operand unchanged
    "relax.bitwise_and": True,
    "relax.logical_and": True,
    "relax.bitwise_or": False,
    "relax.logical_or": False,
}


def _bool_scalar(value: Any) -> bool | None:
    """The value of a boolean constant or ``full`` whose elements are all one value, else None."""
    if isinstance(value, GenericConst) and isinstance(value.value, tvm.runtime.Tensor):
        if str(value.value.dtype) != "bool":
            return None
        data = value.value.numpy()
        return bool(data.flat[0]) if data.size and np.all(data == data.flat[0]) else None
    if op_name(value) == "relax.full" and str(value.ty.dtype) == "bool":
        return _bool_scalar(value.args[1])
    return None


@mutator
class _Fold(FunctionMutator):
    def visit_call_(self, op: relax.Call) -> relax.Expr:
        call = super().visit_call_(op)
        name = op_name(call)
        if name not in _IDENTITY or self.bindings is None:
            return call
        result_shape = static_shape(call.ty.shape)
        for mine, other in ((0, 1), (1, 0)):
            if _bool_scalar(self.bindings.value(call.args[mine])) is not _IDENTITY[name]:
                continue
            keep = call.args[other]
            ty = keep.ty
            if (
                str(ty.dtype) == str(call.ty.dtype)
                and result_shape is not None
                and static_shape(ty.shape) == result_shape
            ):
                self.rewritten += 1
                return keep
        return call


@tvm.transform.module_pass(opt_level=0, name="mlcweb.FoldBoolIdentities")
class FoldBoolIdentities(ModulePassBase):
    """``x & True`` and ``x | False`` on masks become ``x`` (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Fold(mod)
        result = rewrite_and_clean(mod, rewriter)
        if rewriter.rewritten:
            log.info("%d mask operations with a constant identity dropped", rewriter.rewritten)
        return result

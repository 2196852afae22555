"""Integer tensors as int32, for targets whose kernels have no 64- or 8-bit integers (WebGPU).

WGSL's integer types are ``i32`` and ``u32`` only. TVM's WebGPU code generator stops at the first
``int64`` value a kernel computes ("CodeGenWebGPU: do not support i64"), and an ``int8`` buffer becomes
WGSL the browser rejects ("'i8' type used without ... extension"). Index arithmetic is narrowed by TVM
itself; what remains are integer *tensors* that torch.export leaves in a traced model:

- ``int64`` constants, e.g. the index tensor of ``x[:, 0]`` (a ``take``) or of an embedding lookup;
- casts to ``int64`` or ``int8``, e.g. torch SDPA's guard ``any(logical_not(isinf(scores)))``, which
  casts a boolean mask to an integer type to reduce it with ``max``;
- ``arange(..., dtype="int64")``, e.g. the positions CLIP compares to build its causal mask;
- ``argmax`` / ``argmin``, whose result Relax types as ``int64``, e.g. the end-of-text position from which
  CLIP's pooled output (SDXL's second text encoder) is taken. They become the first position where the
  value equals the reduction's max (min), as an int32 ``min`` over ``where(x == max, position, n)``.
  Signed integers are compared as ``uint32`` with the sign bit flipped (the same order), because an
  int32 ``max`` starts from -2147483648, which WGSL cannot write.

This pass rewrites all three to ``int32`` and lets Relax re-infer the types of everything downstream,
so the ``take`` with the index works on int32 instead. A cast of a *boolean* mask becomes ``uint32``
rather than ``int32``: the 0/1 values are the same, and a ``max`` over it starts from 0, where an int32
``max`` starts from -2147483648, a literal WGSL rejects ("value cannot be represented as 'i32'"). Values must fit
in 32 bits: a constant that does not is an error that names it. Function parameters and results are not
changed (feed int32 inputs, return float or int32 outputs); :func:`narrow_integer_tensors` lists the
integer tensors of other widths that are left, so a build can say where.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import GenericConst
from tvm.relax.expr_functor import PyExprMutator, mutator

from .._relax import ModulePassBase, rewrite_relax_functions

__all__ = ["REWRITTEN_DTYPES", "Int32Tensors", "narrow_integer_tensors"]

REWRITTEN_DTYPES = frozenset({"int64", "int16", "int8", "uint16", "uint8"})
_I32 = np.iinfo(np.int32)


@mutator
class _ToInt32(PyExprMutator):
    def visit_generic_const_(self, op: GenericConst) -> relax.Expr:
        if not isinstance(op.value, tvm.runtime.Tensor) or str(op.value.dtype) not in REWRITTEN_DTYPES:
            return op
        value = op.value.numpy()
        if value.size and (value.min() < _I32.min or value.max() > _I32.max):
            raise ValueError(
                f"{value.dtype} constant of shape {value.shape} holds values outside int32 "
                f"({value.min()}..{value.max()})"
            )
        return relax.const(value.astype(np.int32), "int32")

    def visit_call_(self, op: relax.Call) -> relax.Expr:
        call = super().visit_call_(op)
        if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
            return call
        if call.op.name == "relax.astype" and str(call.attrs.dtype) in REWRITTEN_DTYPES:
            source = getattr(call.args[0], "ty", None)
            from_bool = isinstance(source, relax.TensorType) and str(source.dtype) == "bool"
            return relax.op.astype(call.args[0], "uint32" if from_bool else "int32")
        if call.op.name == "relax.arange" and str(call.attrs.dtype) in REWRITTEN_DTYPES:
            return relax.op.arange(*call.args, dtype="int32")
        if call.op.name in ("relax.argmax", "relax.argmin"):
            return _arg_extreme_int32(self.builder_, call)
        return call


def _arg_extreme_int32(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """``argmax(x, axis, keepdims)`` (or argmin) with an int32 result: the first position of the extreme."""
    x = call.args[0]
    ty = x.ty
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return call
    dims = list(ty.shape.values)
    axis = call.attrs.axis
    keepdims = bool(call.attrs.keepdims)
    if axis is None:  # over all elements
        total = 1
        for d in dims:
            if not isinstance(d, tvm.tirx.IntImm):
                return call
            total *= int(d)
        x, dims, axis = bb.emit(relax.op.reshape(x, [total])), [tvm.tirx.IntImm("int64", total)], 0
    axis = int(axis) % len(dims)
    if not isinstance(dims[axis], tvm.tirx.IntImm):
        return call
    n = int(dims[axis])
    dtype = str(ty.dtype)
    if dtype.startswith("int"):  # order-preserving map to uint32: flip the sign bit
        x = bb.emit(relax.op.bitwise_xor(relax.op.astype(x, "uint32"), relax.const(2**31, "uint32")))
    elif dtype == "bool":
        x = bb.emit(relax.op.astype(x, "uint32"))
    extreme = relax.op.max if call.op.name == "relax.argmax" else relax.op.min
    best = bb.emit(extreme(x, axis=axis, keepdims=True))
    shape = [1] * len(dims)
    shape[axis] = n
    positions = relax.const(np.arange(n, dtype=np.int32).reshape(shape), "int32")
    candidates = bb.emit(relax.op.where(relax.op.equal(x, best), positions, relax.const(n, "int32")))
    out = relax.op.min(candidates, axis=axis, keepdims=keepdims)
    if call.attrs.axis is None and keepdims:
        out = relax.op.reshape(out, [1] * len(list(call.args[0].ty.shape.values)))
    return out


@tvm.transform.module_pass(opt_level=0, name="mlcweb.Int32Tensors")
class Int32Tensors(ModulePassBase):
    """Rewrite 64-, 16- and 8-bit integer constants, casts and ranges to int32 (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_relax_functions(mod, _ToInt32(mod))


def narrow_integer_tensors(mod: tvm.IRModule) -> dict[str, list[str]]:
    """Per Relax function, the parameters and bindings whose tensor dtype is in :data:`REWRITTEN_DTYPES`."""
    found: dict[str, list[str]] = {}

    def flagged(expr: relax.Expr) -> bool:
        ty = getattr(expr, "ty", None)
        return isinstance(ty, relax.TensorType) and str(ty.dtype) in REWRITTEN_DTYPES

    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        names = [p.name for p in func.params if flagged(p)]

        def visit(expr: relax.Expr, names: list[str] = names) -> None:
            if isinstance(expr, relax.Var) and flagged(expr):
                names.append(expr.name)

        relax.analysis.post_order_visit(func.body, visit)
        if names:
            found[gv.name_hint] = sorted(set(names))
    return found

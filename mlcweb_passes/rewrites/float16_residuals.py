"""Float16 residuals: the float32 tensors that join two GEMMs' outputs, that an upsampling reads, or
that a reshape or transpose moves to the next kernel, become float16 between kernels.

After :class:`~mlcweb_passes.MixedPrecision` with float32 accumulation, a GEMM's output stays float32
through its bias and residual adds. :class:`~mlcweb_passes.Float16NormInputs` stores the sums that feed
norms as float16. Three more kinds of float32 tensor cross kernels in SD's UNet and VAE and are never
norm inputs:

- the shortcut branch, ``conv_shortcut(x) + bias``: one kernel writes it, the residual add in the main
  branch's second convolution reads it. In the VAE decoder's last block it is 512x512x128, 128 MiB as
  float32;
- a resnet's output that goes to an upsampler: ``resize2d`` reads it as float32, and casts its output to
  float16 for the next convolution (32 and 64 MiB in the decoder);
- a linear layer's output that a layout op (``reshape``, ``permute_dims``, ...) reads: fusion ends the
  GEMM's kernel before an injective op, so the float32 result is written out. The feed-forward's first
  projection writes 8192x2560 floats (80 MiB) for its GEGLU, 790 MiB per UNet step over all linears.

This pass computes them in float16, as PyTorch's float16 models do: an ``add`` of two GEMM results
(same shape) becomes ``astype(add(astype(a, float16), astype(b, float16)), float32)``, a ``resize2d``
of one reads it cast to float16, and a layout op whose operand is a GEMM result used only there becomes
``astype(layout(astype(v, float16)), float32)``. Fusion folds each narrowing cast into the producer's
epilogue, so the kernel that computed the operand writes float16; the add joins the other GEMM's
kernel, and the widening cast after a layout op joins the consumer's kernel. (A widening cast in each
user, as ``Float16NormInputs`` does for norms' other users, would not do here: fusion folds such a cast
into the producer too when it is the producer's only user.) Operands count as GEMM results when
computed from a ``conv2d``, ``matmul`` or ``call_tir`` by elementwise ops and not already a widening
cast of a float16 tensor.
"""

from __future__ import annotations

import logging
from typing import Any

import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from .._relax import LAYOUT_OPS, Bindings, FunctionMutator, ModulePassBase, op_name, rewrite_and_clean

__all__ = ["Float16Residuals"]

log = logging.getLogger(__name__)

GEMMS = ("relax.nn.conv2d", "relax.matmul", "relax.call_tir")  # call_tir: LinearWeightLayout's matmuls
ELEMENTWISE = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.astype")
MAX_WALK = 16  # bindings looked through back to a GEMM


def _gemm_result(var: Any, bindings: Bindings) -> bool:
    """Whether ``var`` is a float32 dataflow variable computed from a GEMM's output by elementwise ops,
    and not a widening cast of a float16 tensor (that one is stored float16 already)."""
    if not isinstance(var, relax.DataflowVar) or str(var.ty.dtype) != "float32":
        return False
    top: Any = bindings.value(var)
    if op_name(top) == "relax.astype" and str(top.args[0].ty.dtype) == "float16":
        return False
    stack, walked = [var], 0
    while stack and walked < MAX_WALK:
        value: Any = bindings.value(stack.pop())
        walked += 1
        name = op_name(value)
        if name in GEMMS:
            return True
        if name in ELEMENTWISE:
            stack.extend(a for a in value.args if isinstance(a, relax.DataflowVar))
    return False


def _same_shape(a: Any, b: Any) -> bool:
    return (
        a.ty.shape is not None
        and b.ty.shape is not None
        and [str(d) for d in a.ty.shape] == [str(d) for d in b.ty.shape]
    )


@mutator
class _Rewriter(FunctionMutator):
    def _float16(self, expr: Any) -> relax.Expr:
        return self.builder_.emit(relax.op.astype(self.visit_expr(expr), "float16"))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        name = op_name(call)
        if self.bindings is None:
            return super().visit_call_(call)
        if name == "relax.add" and _same_shape(*call.args) and all(_gemm_result(a, self.bindings) for a in call.args):
            self.rewritten += 1
            total = self.builder_.emit(relax.op.add(*(self._float16(a) for a in call.args)))
            return relax.op.astype(total, "float32")
        if name == "relax.image.resize2d" and _gemm_result(call.args[0], self.bindings):
            self.rewritten += 1
            rest = [self.visit_expr(a) for a in call.args[1:]]
            resized = self.builder_.emit(relax.Call(call.op, [self._float16(call.args[0]), *rest], call.attrs))
            return relax.op.astype(resized, str(call.ty.dtype))
        source = call.args[0] if call.args else None
        if name in LAYOUT_OPS and self.uses[source] == 1 and _gemm_result(source, self.bindings):
            self.rewritten += 1
            rest = [self.visit_expr(a) for a in call.args[1:]]
            moved = self.builder_.emit(relax.Call(call.op, [self._float16(source), *rest], call.attrs))
            return relax.op.astype(moved, "float32")
        return super().visit_call_(call)


@tvm.transform.module_pass(opt_level=0, name="mlcweb.Float16Residuals")
class Float16Residuals(ModulePassBase):
    """Compute the adds of two GEMM results, and the upsamplings and layout ops of one, in float16."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        result = rewrite_and_clean(mod, rewriter)
        if rewriter.rewritten:
            log.info("%d residual adds, upsamplings and layout ops computed in float16", rewriter.rewritten)
        return result

"""Widen float16 GEMM operands once per workgroup copy instead of once per multiply-add (WebGPU).

A float16 build computes its GEMMs with float32 accumulators: the fused kernel's reduction reads
``f32(a[i, k]) * f32(b[j, k])``. :class:`~mlcweb_passes.webgpu.gemm.WebGPUMatmul` copies the float16
tiles into workgroup memory and registers as they are, so every multiply-add converts both of its
operands again: a thread converts each register value for every output it feeds (8 of them in the
large tile), and a conversion may issue at a fraction of the multiply-add rate.

This pass rewrites each such GEMM as a ``call_tir`` of a kernel whose operands are cast to float32 in
producer stages of the same PrimFunc (``a32 = f32(a)``, ``b32 = f32(b)``, then the GEMM on them):

- ``matmul_nt`` kernels (:func:`~mlcweb_passes.rewrites.linear_weight_layout.nt_matmul`: linear layers,
  merged projections) with float16 operands and a float32 result;
- ``relax.nn.conv2d`` with float16 data and weight and ``out_dtype="float32"`` (TOPI's convolution on
  the widened operands, the same arguments its default legalization passes).

The GEMM schedule inlines those producers into its workgroup-memory copies, so each element is converted
once per workgroup, the tiles are float32 in workgroup memory and the inner loop is plain float32
multiply-adds. The arithmetic is unchanged (the same float32 products and sums), so results are equal
bit for bit; the price is twice the workgroup memory of the float16 tiles, which
:func:`~mlcweb_passes.webgpu.gemm.choose_webgpu_tile` already budgets for. Fused epilogues (bias,
activation, casts, residuals) still fuse: the kernel is still one reduction with elementwise producers.
"""

from __future__ import annotations

import logging
from typing import Any

import tvm
from tvm import relax, te, topi
from tvm.relax.expr_functor import PyExprMutator, mutator

from .._relax import ModulePassBase, op_name, rewrite_and_clean
from ..rewrites.linear_weight_layout import NT_MATMUL_NAME, nt_matmul, nt_matmul_args

__all__ = ["WIDE_CONV_NAME", "WIDE_MATMUL_NAME", "WidenGemmOperands", "widened"]

log = logging.getLogger(__name__)

WIDE_MATMUL_NAME = f"{NT_MATMUL_NAME}_wide"
WIDE_CONV_NAME = "conv2d_wide"
_NARROW, _WIDE = "float16", "float32"


def widened(t: te.Tensor) -> te.Tensor:
    """``t`` cast to float32 in a stage of its own (``<name>_f32``), for a GEMM schedule to inline."""
    return te.compute(t.shape, lambda *i: t(*i).astype(_WIDE), name=f"{t.op.name}_f32")


def _wide_nt_matmul(a: te.Tensor, b: te.Tensor) -> te.Tensor:
    """:func:`~mlcweb_passes.rewrites.linear_weight_layout.nt_matmul` on operands widened in producer stages."""
    return nt_matmul(widened(a), widened(b), _WIDE)


def _wide_conv2d(attrs: Any) -> Any:
    strides, padding, dilation = ([int(v) for v in values] for values in (attrs.strides, attrs.padding, attrs.dilation))

    def conv(data: te.Tensor, weight: te.Tensor) -> te.Tensor:
        return topi.nn.conv(
            inp=widened(data),
            filt=widened(weight),
            stride=strides,
            padding=padding,
            dilation=dilation,
            groups=int(attrs.groups),
            data_layout=str(attrs.data_layout),
            kernel_layout=str(attrs.kernel_layout),
            out_dtype=_WIDE,
        )

    return conv


def _is_plain_nt_matmul(call: relax.Call) -> bool:
    """A ``matmul_nt`` kernel itself, not a variant with its own epilogue (``matmul_nt_geglu``)."""
    return str(call.args[0].name_hint).rstrip("0123456789_") == NT_MATMUL_NAME


def _narrow_operands(*args: relax.Expr) -> bool:
    return all(str(getattr(a.ty, "dtype", "")) == _NARROW for a in args)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.rewritten = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        new = self._widen(call)
        if new is None:
            return super().visit_call_(call)
        self.rewritten += 1
        return new

    def _widen(self, call: relax.Call) -> relax.Expr | None:
        if str(getattr(call.ty, "dtype", "")) != _WIDE:
            return None
        gemm = nt_matmul_args(call)
        if gemm is not None and _is_plain_nt_matmul(call) and _narrow_operands(*gemm):
            a, b = (self.visit_expr(x) for x in gemm)
            return self.builder_.call_te(_wide_nt_matmul, a, b, primfunc_name_hint=WIDE_MATMUL_NAME)
        if op_name(call) == "relax.nn.conv2d" and _narrow_operands(*call.args):
            attrs = call.attrs
            if attrs.out_layout != attrs.data_layout or len(attrs.data_layout) != 4:
                return None  # what TOPI's convolution cannot legalize either
            data, weight = (self.visit_expr(x) for x in call.args)
            return self.builder_.call_te(_wide_conv2d(attrs), data, weight, primfunc_name_hint=WIDE_CONV_NAME)
        return None


@tvm.transform.module_pass(opt_level=0, name="mlcweb.WidenGemmOperands")
class WidenGemmOperands(ModulePassBase):
    """Rewrite float16 GEMMs with float32 results to widen their operands in producer stages (see the
    module docstring). Run before operator fusion, after the passes that write ``matmul_nt`` kernels."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        result = rewrite_and_clean(mod, rewriter)
        if rewriter.rewritten:
            log.info("%d float16 GEMMs widen their operands once per workgroup copy", rewriter.rewritten)
        return result

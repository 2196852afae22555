"""Linear weight layout: keep ``nn.Linear`` weights ``[out, in]`` so the GEMM reduces along contiguous memory.

torch.export imports ``nn.Linear`` as ``matmul(x, permute_dims(w))``. Weight lifting
(:func:`~mlcweb_passes.split_transform_params`) moves the transpose into the transform module, so the
deployed weight is stored ``[in, out]``: the GEMM's reduction axis K is strided in it, and tensor-core
tiles cannot copy it in 16-byte vectors along K (``TensorCoreMatmul`` then falls back to dlight's tiling).

This pass rewrites ``matmul(x, [astype](permute_dims(w)))`` with a two-dimensional ``w`` into one
``call_tir`` of ``out[..., n] = sum_k x[..., k] * w[n, k]`` (the matmul's output dtype, each factor cast
to it), keeping any ``astype`` of ``w`` outside, where lifting stores it. Run it before weight lifting.
The result is the same; only the storage of the weight and the index order of the kernel change.
"""

from __future__ import annotations

import logging
from typing import Any

import tvm
from tvm import relax, te
from tvm.relax.expr_functor import PyExprMutator, mutator

from .._relax import Bindings, ModulePassBase, op_name, rewrite_and_clean

__all__ = ["NT_MATMUL_NAME", "LinearWeightLayout", "nt_matmul", "nt_matmul_args"]

log = logging.getLogger(__name__)


NT_MATMUL_NAME = "matmul_nt"  # the name hint of the kernels this pass writes (other passes look for it)


def nt_matmul(a: te.Tensor, b: te.Tensor, out_dtype: str) -> te.Tensor:
    """``a[..., k] x b[n, k]`` summed over k, in ``out_dtype``."""
    k = te.reduce_axis((0, a.shape[-1]), name="k")
    return te.compute(
        (*a.shape[:-1], b.shape[0]),
        lambda *i: te.sum(a[(*i[:-1], k)].astype(out_dtype) * b[i[-1], k].astype(out_dtype), axis=k),
        name="matmul",
    )


def nt_matmul_args(value: Any) -> tuple[relax.Expr, relax.Expr] | None:
    """``(x, w)`` when ``value`` is a ``call_tir`` of a kernel this pass wrote (``x[..., k] x w[n, k]``),
    else None: what passes that rewrite its calls after it look for."""
    if not isinstance(value, relax.Call) or not value.op.same_as(tvm.ir.Op.get("relax.call_tir")):
        return None
    callee, args = value.args[0], value.args[1]
    if not isinstance(callee, tvm.ir.GlobalVar) or not callee.name_hint.startswith(NT_MATMUL_NAME):
        return None
    if not isinstance(args, relax.Tuple) or len(args.fields) != 2:
        return None
    return args.fields[0], args.fields[1]


def _adds_leading_axes(call: relax.Call) -> bool:
    """True for a ``broadcast_to`` that only prepends axes to a 2-D tensor (keeps its last two)."""
    src, dst = call.args[0].ty.shape, call.ty.shape
    if src is None or dst is None or len(src) != 2 or len(dst) < 2:
        return False
    return all(int(a) == int(b) for a, b in zip(src, list(dst)[-2:], strict=True))


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.bindings: Bindings | None = None
        self.rewritten = 0

    def visit_function_(self, func: relax.Function) -> relax.Expr:
        self.bindings = Bindings(func)
        return super().visit_function_(func)

    def _value(self, expr: Any) -> Any:
        return self.bindings.value(expr) if self.bindings is not None else expr

    def _weight_nk(self, b: Any) -> relax.Expr | None:
        """For ``b = [astype](permute_dims(w, [1, 0]))`` with 2-D ``w``, possibly broadcast over leading
        batch axes (torch exports a linear on a non-contiguous 3-D input as a batched matmul with the
        weight expanded): ``[astype](w)``, else None."""
        value = self._value(b)
        cast = None
        for _ in range(2):
            if op_name(value) == "relax.astype" and cast is None:
                cast = str(value.attrs.dtype)
                value = self._value(value.args[0])
            elif op_name(value) == "relax.broadcast_to" and _adds_leading_axes(value):
                value = self._value(value.args[0])
        if op_name(value) != "relax.permute_dims":
            return None
        w = value.args[0]
        if len(w.ty.shape) != 2 or (value.attrs.axes is not None and [int(a) for a in value.attrs.axes] != [1, 0]):
            return None
        w = self.visit_expr(w)
        return relax.op.astype(w, cast) if cast is not None else w

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if op_name(call) == "relax.matmul" and len(call.args[0].ty.shape) >= 1:
            weight = self._weight_nk(call.args[1])
            if weight is not None:
                a = self.visit_expr(call.args[0])
                out_dtype = str(call.ty.dtype)
                self.rewritten += 1
                w = self.builder_.emit(weight)
                return self.builder_.call_te(nt_matmul, a, w, out_dtype, primfunc_name_hint=NT_MATMUL_NAME)
        return super().visit_call_(call)


@tvm.transform.module_pass(opt_level=0, name="mlcweb.LinearWeightLayout")
class LinearWeightLayout(ModulePassBase):
    """Rewrite ``matmul(x, permute_dims(w))`` (``nn.Linear``) to read ``w`` as stored, ``[out, in]``."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        result = rewrite_and_clean(mod, rewriter)
        if rewriter.rewritten:
            log.info("%d linear layers read their weights [out, in]", rewriter.rewritten)
        return result

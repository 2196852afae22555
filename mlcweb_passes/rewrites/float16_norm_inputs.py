"""Float16 norm inputs: store the float32 tensors that feed group and layer norms as float16.

After :class:`~mlcweb_passes.MixedPrecision` with float32 accumulation, a convolution's or linear's
output, its bias and the residual adds after it stay float32 up to the next normalisation, which
computes its statistics in float32. Fusion puts that chain in the GEMM's epilogue, so the float32 sum
is what one kernel writes and the norm (and the next residual add) read back: in SD1.5's VAE decoder a
512x512x256 float32 tensor is 256 MiB, twice its float16 size, and the decoder is bound by those bytes.

For every float32 tensor ``v`` that is the input of ``nn.group_norm`` or ``nn.layer_norm``, this pass
writes ``v16 = astype(v, float16)`` right after it. The norms then take ``v16`` itself (TOPI's norms
read float16 and reduce in float32; their scale and shift are cast to float16) and cast their output to
float32; a user that casts ``v`` to float16 takes ``v16``; every other user gets its own
``astype(v16, float32)``. Fusion folds the first cast into the producer's epilogue (it writes
float16), and the others into their consumers. Values are rounded to float16 once between kernels, as
PyTorch's float16 models do everywhere; accumulations stay float32.
"""

from __future__ import annotations

import logging
from typing import Any

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .._relax import ModulePassBase, op_name, rewrite_and_clean

__all__ = ["Float16NormInputs"]

log = logging.getLogger(__name__)

NORMS = ("relax.nn.group_norm", "relax.nn.layer_norm")


def _norm_inputs(func: relax.Function) -> set[Any]:
    """The float32 dataflow variables ``func`` passes to a norm as its data."""
    found: set[Any] = set()
    for value in relax.analysis.get_var2val(func).values():
        if op_name(value) in NORMS:
            data = value.args[0]
            if isinstance(data, relax.DataflowVar) and str(data.ty.dtype) == "float32":
                found.add(data)
    return found


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.targets: set[Any] = set()
        self.narrowed: dict[Any, relax.Var] = {}  # original variable -> its float16 copy
        self.rewritten = 0

    def visit_function_(self, func: relax.Function) -> relax.Expr:
        self.targets, self.narrowed = _norm_inputs(func), {}
        return super().visit_function_(func)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        super().visit_var_binding_(binding)
        if binding.var in self.targets:
            emitted = self.visit_expr(binding.var)  # the variable as re-emitted
            self.narrowed[binding.var] = self.builder_.emit(relax.op.astype(emitted, "float16"))
            self.rewritten += 1

    def _widened(self, arg: Any) -> Any:
        if isinstance(arg, relax.Var) and arg in self.narrowed:
            return self.builder_.emit(relax.op.astype(self.narrowed[arg], "float32"))
        if isinstance(arg, relax.Tuple) and any(f in self.narrowed for f in arg.fields if isinstance(f, relax.Var)):
            return relax.Tuple([self._widened(f) for f in arg.fields])
        return self.visit_expr(arg)

    def _float16_norm(self, call: relax.Call) -> relax.Expr:
        """The norm on the float16 copy (TOPI's norms reduce float16 data in float32), cast back."""
        params = [self.builder_.emit(relax.op.astype(self.visit_expr(p), "float16")) for p in call.args[1:]]
        norm = self.builder_.emit(relax.Call(call.op, [self.narrowed[call.args[0]], *params], call.attrs))
        return relax.op.astype(norm, "float32")

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if op_name(call) in NORMS and call.args[0] in self.narrowed:
            return self._float16_norm(call)
        if op_name(call) == "relax.astype" and call.args[0] in self.narrowed and str(call.ty.dtype) == "float16":
            return self.narrowed[call.args[0]]  # already float16: no round trip
        if not any((isinstance(a, relax.Var) and a in self.narrowed) or isinstance(a, relax.Tuple) for a in call.args):
            return super().visit_call_(call)
        return relax.Call(call.op, [self._widened(a) for a in call.args], call.attrs, call.ty_args)


@tvm.transform.module_pass(opt_level=0, name="mlcweb.Float16NormInputs")
class Float16NormInputs(ModulePassBase):
    """Store each float32 norm input as float16 between kernels (one cast after it, one per user)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        result = rewrite_and_clean(mod, rewriter)
        if rewriter.rewritten:
            log.info("%d float32 norm inputs stored as float16", rewriter.rewritten)
        return result

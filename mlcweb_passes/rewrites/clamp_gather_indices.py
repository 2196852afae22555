"""Gather indices clamped into the table, so no input can make a kernel read outside a buffer.

``relax.take`` (an embedding lookup, ``x[:, i]``) legalizes to a kernel that loads ``table[index]`` with
no bounds check: TVM warns "Fast mode segfaults when there are out-of-bounds indices". A token id past
the vocabulary then reads another tensor's memory on the CPU (or crashes the process, for ids far out),
and on a GPU reads past the weight buffer. This pass switches every such ``take`` to TOPI's ``clip``
mode, which clamps each index to ``[0, extent - 1]`` of the gathered axis inside the gather kernel, so
an id out of range reads the nearest row. Inputs in range give the same result. Runtimes should still
reject ids out of range (``mlcweb`` checks each input against the range its plugin declares): this
makes the compiled code safe when one gets through.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .._relax import ModulePassBase, op_name, rewrite_and_clean

__all__ = ["ClampGatherIndices"]

log = logging.getLogger(__name__)


@mutator
class _Clamp(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.clamped = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if op_name(call) != "relax.take" or str(call.attrs.mode) != "fast":
            return call
        self.clamped += 1
        axis = call.attrs.axis
        return relax.op.take(*call.args, axis=None if axis is None else int(axis), mode="clip")


@tvm.transform.module_pass(opt_level=0, name="mlcweb.ClampGatherIndices")
class ClampGatherIndices(ModulePassBase):
    """Every ``take`` clamps its indices into the gathered axis (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Clamp(mod)
        result = rewrite_and_clean(mod, rewriter)
        if rewriter.clamped:
            log.info("%d gathers clamp their indices", rewriter.clamped)
        return result

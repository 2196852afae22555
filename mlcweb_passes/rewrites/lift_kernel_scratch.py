"""Lift the global scratch buffers of scheduled kernels into Relax tensors the memory planner places.

A schedule that splits one PrimFunc into several GPU kernels (``rfactor`` partial sums, a reduction's
statistics read by the elementwise kernel after it) leaves the buffers the kernels pass along as global
allocations in the PrimFunc's root block. The compiled function takes them from TVM's runtime workspace
pool on every call. Under CUDA graphs that is wrong: a graph records the address it got when it was
captured, and the pool frees a page and allocates a bigger one when a later call asks for more. The
graph then writes to freed memory that something else may own (seen with SD1.5: each graph ran fine
alone, but a whole image, in which the VAE's larger scratch came after the UNet's capture, was wrong).

:class:`LiftKernelScratch` rewrites each such PrimFunc to take its global scratch buffers as extra
output parameters, and every ``call_tir`` of it to allocate them as extra outputs, of which it keeps the
original ones::

    # before                                   # after
    y = R.call_tir(norm, (x,), out_sinfo=T)    t = R.call_tir(norm, (x,), out_sinfo=[T, S1, S2])
                                               y = t[0]

``StaticMemoryPlan`` then gives the scratch tensors fixed places, reused between kernels like any
intermediate, and graphs capture those. Buffers in other scopes (shared, local) are not touched; nor
are buffers of symbolic shape, or PrimFuncs that something other than a plain ``call_tir`` uses.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from .._relax import ModulePassBase, rewrite_relax_functions

__all__ = ["LiftKernelScratch"]

log = logging.getLogger(__name__)


def _lift(func: tirx.PrimFunc) -> tuple[tirx.PrimFunc, list[relax.TensorType]] | None:
    """``func`` with its root block's global buffers as trailing parameters, and their tensor types."""
    realize = func.body
    if not isinstance(realize, s_tir.SBlockRealize):
        return None
    root = realize.block
    lifted = [buf for buf in root.alloc_buffers if buf.scope() == "global"]
    if not lifted or not all(isinstance(d, tirx.IntImm) for buf in lifted for d in buf.shape):
        return None  # none, or sized by the call's shapes: left to the workspace pool
    kept = [buf for buf in root.alloc_buffers if buf.scope() != "global"]
    block = s_tir.SBlock(
        root.iter_vars,
        root.reads,
        root.writes,
        root.name_hint,
        root.body,
        root.init,
        kept,
        root.match_buffers,
        root.annotations,
    )
    body = s_tir.SBlockRealize(realize.iter_values, realize.predicate, block)
    new = tirx.PrimFunc([*func.params, *lifted], body, func.ret_type, func.attrs)
    types = [relax.TensorType([int(d) for d in buf.shape], str(buf.dtype)) for buf in lifted]
    return new, types


def _plain_callees(mod: tvm.IRModule) -> set[str]:
    """PrimFuncs only ever called by ``call_tir`` without ``tir_vars``: the calls this pass can rewrite
    (``call_tir``'s Python constructor takes no ``tir_vars``; other uses, such as ``call_tir_inplace``,
    would keep the old signature)."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    plain: set[str] = set()
    other: set[str] = set()

    def visit(expr: relax.Expr) -> None:
        if not isinstance(expr, relax.Call):
            return
        callee = [expr.args[0]] if expr.args and isinstance(expr.args[0], tvm.ir.GlobalVar) else []
        if expr.op.same_as(call_tir) and len(expr.args) == 2:
            plain.update(gv.name_hint for gv in callee)
        else:
            other.update(arg.name_hint for arg in expr.args if isinstance(arg, tvm.ir.GlobalVar))

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return plain - other


@mutator
class _Callers(PyExprMutator):
    def __init__(
        self, mod: tvm.IRModule, lifted: dict[tvm.ir.GlobalVar, tuple[tirx.PrimFunc, list[relax.TensorType]]]
    ) -> None:
        super().__init__(mod)
        self.call_tir = tvm.ir.Op.get("relax.call_tir")
        # New GlobalVars, added through the builder: it gives them the new signature, which call_tir checks
        # (the old ones keep the signature they were made with).
        self.replaced = {
            gv: (self.builder_.add_func(func, gv.name_hint), types) for gv, (func, types) in lifted.items()
        }

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not call.op.same_as(self.call_tir) or call.args[0] not in self.replaced:
            return call
        gv, scratch = self.replaced[call.args[0]]
        outs = call.ty_args[0]
        fields = list(outs.fields) if isinstance(outs, relax.TupleType) else [outs]
        both = self.builder_.emit(relax.call_tir(gv, call.args[1], [*fields, *scratch]))
        if isinstance(outs, relax.TupleType):
            return relax.Tuple([relax.TupleGetItem(both, i) for i in range(len(fields))])
        return relax.TupleGetItem(both, 0)


@tvm.transform.module_pass(opt_level=0, name="mlcweb.LiftKernelScratch")
class LiftKernelScratch(ModulePassBase):
    """Make each PrimFunc's global scratch buffers extra ``call_tir`` outputs (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        callees = _plain_callees(mod)
        lifted: dict[tvm.ir.GlobalVar, tuple[tirx.PrimFunc, list[relax.TensorType]]] = {}
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc) and gv.name_hint in callees and (found := _lift(func)) is not None:
                lifted[gv] = found
        if not lifted:
            return mod
        mod = mod.clone()  # never edit the caller's module in place
        for gv in lifted:
            del mod[gv]
        log.info("lifted the global scratch buffers of %d kernels into Relax tensors", len(lifted))
        result: tvm.IRModule = rewrite_relax_functions(mod, _Callers(mod, lifted))
        return result

"""Attention in query chunks: no score matrix larger than a bound.

Attention that no fused kernel takes (on WebGPU: masked attention, the VAE's 512-wide head, or every
attention with ``flash_attention=False``) computes its whole score matrix: SD1.5's UNet at 64x64
latents holds ``[2 x 8 heads, 4096, 4096]`` scores, 1 GiB in float32 and 512 MiB in float16, one buffer
the memory plan cannot split, exactly the 1 GiB binding limit tvmjs asks adapters for, and more than
many adapters grant. The webgpu pipeline runs this pass after ``FlashAttention``.

:class:`ChunkAttentionRows` finds ``matmul(P, v)`` where ``P`` is ``softmax(matmul(q, k) * c)`` through
casts, scalar scales and reshapes that keep the last two axes, and whose largest score tensor is over
``max_bytes``. It rewrites it into ``n`` attentions over slices of ``q``'s rows (``n`` the fewest that
divide the rows and bring each chunk's scores under ``max_bytes``) and concatenates their outputs along
the rows. Each chunk runs the same kernels on a slice; memory planning reuses one chunk's score buffer
for the next. Exact: every row of a softmax attention depends on its own query row only.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .._relax import Bindings, ModulePassBase, op_name, rewrite_and_clean, static_shape

__all__ = ["MAX_SCORE_BYTES", "ChunkAttentionRows"]

log = logging.getLogger(__name__)

MAX_SCORE_BYTES = 256 * 2**20  # half of the 512 MiB the webgpu build keeps every buffer under
_CHAIN = ("relax.astype", "relax.multiply", "relax.divide", "relax.reshape", "relax.broadcast_to", "relax.nn.softmax")


def _nbytes(expr: relax.Expr) -> int:
    shape = static_shape(expr.ty.shape)
    return 0 if shape is None else math.prod(shape) * tvm.runtime.DataType(str(expr.ty.dtype)).bits // 8


def _is_scalar(expr: relax.Expr) -> bool:
    shape = static_shape(getattr(expr.ty, "shape", None)) if hasattr(expr, "ty") else None
    return shape is not None and math.prod(shape) == 1


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, max_bytes: int) -> None:
        super().__init__(mod)
        self.max_bytes = max_bytes
        self.bindings: Bindings | None = None
        self.rewritten: list[int] = []

    def visit_function_(self, func: relax.Function) -> relax.Expr:
        self.bindings = Bindings(func)
        return super().visit_function_(func)

    def _chain(self, expr: relax.Expr) -> tuple[list[relax.Call], relax.Call] | None:
        """From ``P`` back to the score matmul: the ops between (forward order) and the matmul."""
        assert self.bindings is not None
        ops: list[relax.Call] = []
        value = self.bindings.value(expr)
        while op_name(value) in _CHAIN:
            name = op_name(value)
            if name in ("relax.multiply", "relax.divide") and not _is_scalar(value.args[1]):
                return None
            if name == "relax.nn.softmax" and int(value.attrs.axis) not in (-1, len(value.ty.shape) - 1):
                return None
            if name in ("relax.reshape", "relax.broadcast_to"):
                before, after = static_shape(value.args[0].ty.shape), static_shape(value.ty.shape)
                if before is None or after is None:
                    return None
                if not (before == after if name == "relax.broadcast_to" else before[-2:] == after[-2:]):
                    return None
            ops.append(value)
            value = self.bindings.value(value.args[0])
        if op_name(value) != "relax.matmul" or sum(op_name(o) == "relax.nn.softmax" for o in ops) != 1:
            return None
        return ops[::-1], value

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if op_name(call) != "relax.matmul" or self.bindings is None:
            return super().visit_call_(call)
        found = self._chain(call.args[0])
        if found is None:
            return super().visit_call_(call)
        ops, scores = found
        largest = max(_nbytes(x) for x in [scores, *ops])
        shape = static_shape(scores.ty.shape)
        if largest <= self.max_bytes or shape is None or len(shape) < 2:
            return super().visit_call_(call)
        rows = shape[-2]
        chunks = next((n for n in range(math.ceil(largest / self.max_bytes), rows + 1) if rows % n == 0), 1)
        if chunks <= 1:
            return super().visit_call_(call)
        q, k, v = (self.visit_expr(a) for a in (scores.args[0], scores.args[1], call.args[1]))
        step, axis = rows // chunks, len(shape) - 2
        outs = []
        for i in range(chunks):
            qc = self.builder_.emit(relax.op.strided_slice(q, axes=[axis], begin=[i * step], end=[(i + 1) * step]))
            x = self.builder_.emit(relax.op.matmul(qc, k, out_dtype=scores.attrs.out_dtype))
            for op in ops:
                x = self.builder_.emit(self._reapply(op, x, step))
            outs.append(self.builder_.emit(relax.op.matmul(x, v, out_dtype=call.attrs.out_dtype)))
        self.rewritten.append(chunks)
        return relax.op.concat(outs, axis=len(call.ty.shape) - 2)

    @staticmethod
    def _reapply(op: relax.Call, x: relax.Expr, rows: int) -> relax.Expr:
        """``op`` applied to chunk ``x`` instead of its whole-matrix input."""
        if op_name(op) in ("relax.reshape", "relax.broadcast_to"):
            target = list(static_shape(op.ty.shape) or [])
            target[-2] = rows
            return relax.op.reshape(x, target) if op_name(op) == "relax.reshape" else relax.op.broadcast_to(x, target)
        args: list[Any] = [x, *op.args[1:]]
        return relax.Call(op.op, args, op.attrs)


@tvm.transform.module_pass(opt_level=0, name="mlcweb.ChunkAttentionRows")
class ChunkAttentionRows(ModulePassBase):
    """Split attentions whose score matrix exceeds ``max_bytes`` into query-row chunks (see the module
    docstring)."""

    def __init__(self, max_bytes: int = MAX_SCORE_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self.max_bytes = max_bytes

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Rewriter(mod, self.max_bytes)
        result = rewrite_and_clean(mod, rewriter)
        if rewriter.rewritten:
            log.info("%d attentions computed in query chunks (%s)", len(rewriter.rewritten), rewriter.rewritten)
        return result

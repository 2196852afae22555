"""Flash attention as a Relax rewrite: each attention over head transposes becomes one kernel.

:class:`FlashAttention` finds ``matmul -> [scale] -> softmax -> matmul`` over head transposes (as
torch.export and :class:`~mlcweb_passes.MixedPrecision` leave SDPA) and calls a kernel that never
stores the score matrix: :func:`~mlcweb_passes.cuda.flash_kernel.flash_attention_kernel` (CUDA, float16)
by default, :func:`~mlcweb_passes.webgpu.flash_attention.webgpu_flash_attention_kernel` (float16 and
float32) on WebGPU.
The kernel's inputs and output are ``[batch, seq, heads, head_dim]``, the layout attention's projections
produce before torch's head transposes, so the transposes go too. Masked attention (an added mask, e.g.
CLIP's causal one) and head dimensions over :data:`~mlcweb_passes.cuda.flash_kernel.MAX_HEAD_DIM` (the
VAE's single 512-wide head) are left to the unfused path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from .._relax import Bindings, ModulePassBase, op_name, rewrite_and_clean, static_shape
from .flash_kernel import NO_VIEWS, AttentionShape, Views, flash_attention_kernel

__all__ = ["FlashAttention", "match_attention"]

log = logging.getLogger(__name__)


# (shape, scale, views=NO_VIEWS, dtype="float16"): flash_attention_kernel's; views and dtype are passed
# only when they are not the defaults, so a factory for plain float16 attention may take neither
KernelFactory = Callable[..., tirx.PrimFunc]
Supports = Callable[[AttentionShape, str], bool]  # whether the kernel takes (shape, dtype)


@dataclass(frozen=True)
class _Match:
    """One attention found in the graph: its ``[B, N, H, D]`` inputs, scale, shape and dtype."""

    q: relax.Expr
    k: relax.Expr
    v: relax.Expr
    scale: float
    shape: AttentionShape
    dtype: str = "float16"


class _Walker(Bindings):
    """Follows a value back through the bindings of one function: scalars, head transposes."""

    def scalar(self, expr: Any) -> float | None:
        """The value of a scalar constant, possibly cast, else None."""
        value = self.value(expr)
        if op_name(value) == "relax.astype":
            value = self.value(value.args[0])
        if isinstance(value, tvm.ir.expr.Constant) and value.value.numpy().size == 1:
            return float(value.value.numpy().reshape(()))
        return None

    def heads_view(
        self, expr: Any, perm: list[int], dtypes: tuple[str, ...] = ("float16",)
    ) -> tuple[Any, float] | None:
        """For ``expr`` = permutes (composing to ``perm``) and scalar multiplies of a 4-D tensor ``x``:
        ``(x, product of the scalars)``; else None. ``expr`` itself is first followed back through
        reshapes and broadcasts that only split or merge the batch and head axes."""
        expr, value = self.through(expr, ("relax.reshape", "relax.broadcast_to"))
        scale, axes = 1.0, list(range(4))  # expr's axis i is x's axis axes[i]
        while True:
            name = op_name(value)
            if name == "relax.multiply" and (c := self.scalar(value.args[1])) is not None:
                scale *= c
            elif name == "relax.permute_dims":
                composed = _through_permute(axes, value)
                if composed is None:
                    return None
                axes = composed
            else:
                break
            expr = value.args[0]
            value = self.value(expr)
        if axes != perm or len(expr.ty.shape) != 4 or str(expr.ty.dtype) not in dtypes:
            return None
        return expr, scale


def _through_permute(axes: list[int], call: relax.Call) -> list[int] | None:
    """Axis map ``axes`` (axis i of a result is axis ``axes[i]`` of ``call``'s output) carried back to
    ``call``'s input; None when ``call`` has no explicit axes or another rank than ``axes``."""
    perm = call.attrs.axes
    if perm is None or len(perm) != len(axes):
        return None
    return [int(perm[i]) for i in axes]


def match_attention(
    walker: _Walker, call: relax.Call, dtypes: tuple[str, ...] = ("float16",), supports: Supports | None = None
) -> _Match | None:
    """``matmul(softmax(matmul(q', k') * c), v')`` where q', k', v' are head transposes of
    ``[B, N, H, D]`` tensors of one of ``dtypes`` (all three the same) whose shape the kernel takes
    (``supports``, default :meth:`AttentionShape.supported`), else None."""
    if op_name(call) != "relax.matmul":
        return None
    _, soft = walker.through(call.args[0], ("relax.astype", "relax.reshape", "relax.broadcast_to"))
    if op_name(soft) != "relax.nn.softmax" or int(soft.attrs.axis) not in (-1, len(soft.ty.shape) - 1):
        return None
    _, scores = walker.through(soft.args[0], ("relax.astype", "relax.reshape"))
    scale = 1.0
    while op_name(scores) in ("relax.multiply", "relax.divide") and (c := walker.scalar(scores.args[1])) is not None:
        scale *= c if op_name(scores) == "relax.multiply" else 1.0 / c
        _, scores = walker.through(scores.args[0], ("relax.astype", "relax.reshape"))
    if op_name(scores) != "relax.matmul":
        return None
    q = walker.heads_view(scores.args[0], [0, 2, 1, 3], dtypes)
    k = walker.heads_view(scores.args[1], [0, 2, 3, 1], dtypes)
    v = walker.heads_view(call.args[1], [0, 2, 1, 3], dtypes)
    if q is None or k is None or v is None or v[1] != 1.0:  # a scaled V would scale the output instead
        return None
    dtype = str(q[0].ty.dtype)
    if str(k[0].ty.dtype) != dtype or str(v[0].ty.dtype) != dtype:
        return None
    qs, ks, vs = (static_shape(x[0].ty.shape) for x in (q, k, v))
    if qs is None or ks is None or vs is None or ks != vs or qs[0] != ks[0] or qs[2:] != ks[2:]:
        return None
    shape = AttentionShape(qs[0], qs[1], ks[1], qs[2], qs[3])
    total_scale = scale * q[1] * k[1]
    takes = supports(shape, dtype) if supports is not None else shape.supported()
    if not takes or total_scale <= 0:  # a softmax temperature is positive
        return None
    return _Match(q[0], k[0], v[0], total_scale, shape, dtype)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(
        self, mod: tvm.IRModule, kernel: KernelFactory, pack: bool, dtypes: tuple[str, ...], supports: Supports | None
    ) -> None:
        super().__init__(mod)
        self.kernel = kernel
        self.pack = pack
        self.dtypes = dtypes
        self.supports = supports
        self.walker: _Walker | None = None
        self.kernels: dict[tuple[AttentionShape, float, Views, str], tvm.ir.GlobalVar] = {}
        self.outputs: dict[relax.Call, relax.Var] = {}  # attention matmul -> its kernel call's output
        self.rewritten = 0

    def visit_function_(self, func: relax.Function) -> relax.Expr:
        self.walker = _Walker(func)
        return super().visit_function_(func)

    def _kernel(self, shape: AttentionShape, scale: float, views: Views, dtype: str) -> tvm.ir.GlobalVar:
        key = (shape, scale, views, dtype)
        if key not in self.kernels:
            extra: dict[str, Any] = {}
            if views != NO_VIEWS:
                extra["views"] = views
            if dtype != "float16":
                extra["dtype"] = dtype
            self.kernels[key] = self.builder_.add_func(self.kernel(shape, scale, **extra), "flash_attention")
        return self.kernels[key]

    def _view(self, x: relax.Expr, shape: AttentionShape) -> tuple[relax.Expr, tuple[str, ...], int, int] | None:
        """For a ``[B, N, H, D]`` input that is part ``i`` of ``split(h, count)`` along h's last axis (equal
        parts, :class:`MergeProjections`), cast and reshaped: ``(h, the casts, outermost first, count, i)``,
        so the kernel can read the part where it is; else None."""
        if self.walker is None:
            return None
        casts: list[str] = []
        value = self.walker.value(x)
        while op_name(value) in ("relax.reshape", "relax.astype"):
            if op_name(value) == "relax.astype":
                casts.append(str(value.attrs.dtype))
            value = self.walker.value(value.args[0])
        if not isinstance(value, relax.TupleGetItem):
            return None
        split = self.walker.value(value.tuple_value)
        if op_name(split) != "relax.split":
            return None
        h = split.args[0]
        dims, width = static_shape(h.ty.shape), shape.heads * shape.head_dim
        if dims is None or dims[-1] % width or int(split.attrs.axis) not in (-1, len(dims) - 1):
            return None
        count, sections = dims[-1] // width, split.attrs.indices_or_sections
        if isinstance(sections, tirx.IntImm | int) or [int(x) for x in sections] != [
            width * i for i in range(1, count)
        ]:
            return None
        return h, tuple(casts), count, int(value.index)

    def _inputs(self, found: _Match) -> tuple[list[relax.Expr], Views]:
        """The kernel's three inputs and their views: parts of merged projections read in place (one
        binding per merged tensor), other inputs as they are."""
        args: list[relax.Expr] = []
        views: list[tuple[int, int] | None] = []
        emitted: list[tuple[relax.Expr, tuple[str, ...], relax.Expr]] = []  # (h, casts, its view)
        s = found.shape
        for x in (found.q, found.k, found.v):
            view = self._view(x, s) if self.pack else None
            if view is None:
                args.append(self.visit_expr(x))
                views.append(None)
                continue
            h, casts, count, index = view
            bound = next((v for e, c, v in emitted if e.same_as(h) and c == casts), None)
            if bound is None:  # bind each merged tensor's view once (Q, K and V of one projection share it)
                whole = self.visit_expr(h)
                for dtype in reversed(casts):  # collected outermost first
                    whole = relax.op.astype(whole, dtype)
                rows = int(x.ty.shape[1])
                bound = self.builder_.emit(relax.op.reshape(whole, [s.batch, rows, count, s.heads, s.head_dim]))
                emitted.append((h, casts, bound))
            args.append(bound)
            views.append((count, index))
        return args, (views[0], views[1], views[2])

    def _heads_last(self, call: relax.Call) -> relax.Var | None:
        """For permutes that move the attention's ``[B, H, N, D]`` output (reshaped, maybe cast) back to
        ``[B, N, H, D]``, torch's transpose after attention: the kernel's output, which is that already."""
        if self.walker is None or op_name(call) != "relax.permute_dims" or str(call.ty.dtype) not in self.dtypes:
            return None
        axes, value = list(range(4)), call
        while op_name(value) == "relax.permute_dims":
            composed = _through_permute(axes, value)
            if composed is None:
                return None
            axes, value = composed, self.walker.value(value.args[0])
        if axes != [0, 2, 1, 3]:
            return None
        _, value = self.walker.through(value, ("relax.astype", "relax.reshape"))
        out = self.outputs.get(value)
        if out is None or static_shape(call.ty.shape) != static_shape(out.ty.shape):
            return None
        return out

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if (out := self._heads_last(call)) is not None:
            return out
        found = match_attention(self.walker, call, self.dtypes, self.supports) if self.walker is not None else None
        if found is None:
            return super().visit_call_(call)
        s = found.shape
        args, views = self._inputs(found)
        kernel = self._kernel(s, found.scale, views, found.dtype)
        out = self.builder_.emit(
            relax.call_tir(kernel, args, relax.TensorType((s.batch, s.q_len, s.heads, s.head_dim), found.dtype))
        )
        self.rewritten += 1
        self.outputs[call] = out
        # back to the matmul's [B * H, N, D] (or [B, H, N, D]); the head transposes that follow cancel
        heads_first = relax.op.permute_dims(out, [0, 2, 1, 3])
        result = relax.op.reshape(heads_first, [int(x) for x in call.ty.shape])
        return relax.op.astype(result, str(call.ty.dtype))


@tvm.transform.module_pass(opt_level=0, name="mlcweb.FlashAttention")
class FlashAttention(ModulePassBase):
    """Replace each ``softmax(Q @ K^T * scale) @ V`` over head transposes whose inputs are one of
    ``dtypes`` (float16 by default) with one call of a flash-attention kernel (``kernel``:
    :func:`flash_attention_kernel` by default, CUDA sm_80+), reading Q, K and V as the ``[B, N, H, D]``
    tensors the transposes started from, or, with ``pack`` (default), where they are in the merged
    projections they were split from (:class:`MergeProjections`), so the splits are not computed.
    ``supports(shape, dtype)`` says which attentions the kernel takes (default: head dimensions up to
    :data:`~mlcweb_passes.cuda.flash_kernel.MAX_HEAD_DIM`); the others are left as they are."""

    def __init__(
        self,
        kernel: KernelFactory | None = None,
        pack: bool = True,
        dtypes: tuple[str, ...] = ("float16",),
        supports: Supports | None = None,
    ) -> None:
        self.kernel = kernel or flash_attention_kernel
        self.pack = pack
        self.dtypes = tuple(dtypes)
        self.supports = supports

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Rewriter(mod, self.kernel, self.pack, self.dtypes, self.supports)
        result = rewrite_and_clean(mod, rewriter)
        if rewriter.rewritten:
            log.info("%d attentions became flash-attention kernels", rewriter.rewritten)
        return result

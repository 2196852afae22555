"""Flash attention: ``softmax(Q @ K^T * scale) @ V`` in one CUDA kernel on tensor cores.

Stable Diffusion's self-attention at 64x64 latents has 4096 tokens: unfused, each head's 4096x4096 score
matrix is written by one kernel and read back by the softmax and by ``P @ V``, 512 MiB a layer for the
UNet's batch of two with eight heads. :func:`flash_attention_kernel` is one hand-written TIR kernel that
never stores the scores: each thread block takes 64 query rows of one head and walks the keys 64 at a
time, as in FlashAttention (Dao et al., 2022):

1. the block's Q tile is loaded once into WMMA ``matrix_a`` fragments (head dimension zero-padded to a
   multiple of 16); each K/V tile is copied into shared memory in 16-byte vectors, rows past the
   sequence zero-filled;
2. each of the 4 warps computes its 16x64 slice of the scores ``Q @ K^T`` with float32 accumulators;
3. an online softmax keeps each row's running maximum and sum in registers (two threads a row): the
   tile's probabilities are written as float16 for the next product and the running output is rescaled
   by ``exp(m_old - m_new)``;
4. ``P @ V`` on tensor cores adds the tile's share to the output, which each thread keeps in registers;
5. at the end every row is divided by its sum and written as float16 in the input's ``[B, N, H, D]``
   layout.

Inputs and output are ``[batch, seq, heads, head_dim]`` float16, the layout attention's projections
produce before torch's head transposes, so the transposes disappear too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.script import tirx as T  # noqa: N812

from ._base import ModulePassBase, op_name, rewrite_and_clean
from .tensor_core_matmul import sm_version

__all__ = [
    "MAX_HEAD_DIM",
    "AttentionShape",
    "FlashAttention",
    "flash_attention_kernel",
    "match_attention",
    "reference_attention_kernel",
    "supports_flash_attention",
]

log = logging.getLogger(__name__)

BLOCK_M = 64  # query rows per thread block (16 per warp)
BLOCK_N = 64  # keys per step
WARPS = 4
FRAGMENT = 16
MAX_HEAD_DIM = 160  # the float32 score/output staging tile must fit static shared memory (48 KiB)
SHARED_STATIC_LIMIT = 48 * 1024  # bytes of shared memory a kernel gets without opting in
NEG_INF = -1e30
MIN_SM = 80  # finite: exp(NEG_INF - m) is 0 without inf - inf


@dataclass(frozen=True)
class AttentionShape:
    """One attention call: ``batch x heads`` independent products of ``q_len`` queries and ``kv_len`` keys."""

    batch: int
    q_len: int
    kv_len: int
    heads: int
    head_dim: int

    def supported(self) -> bool:
        """True when :func:`flash_attention_kernel` handles this shape."""
        return 0 < self.head_dim <= MAX_HEAD_DIM and min(self.batch, self.q_len, self.kv_len, self.heads) > 0


def _vector_width(head_dim: int) -> int:
    """Elements per global load: 16 bytes where every row starts 16-byte aligned, less otherwise."""
    for width in (8, 4, 2):
        if head_dim % width == 0:
            return width
    return 1


def flash_attention_kernel(shape: AttentionShape, scale: float) -> tirx.PrimFunc:
    """The kernel ``o = softmax(q @ k^T * scale) @ v`` for ``shape`` (float16 in and out, float32 inside),
    marked ``tirx.is_scheduled`` so schedule rules leave it alone."""
    if not shape.supported():
        raise ValueError(f"flash attention does not support {shape} (head_dim must be 1..{MAX_HEAD_DIM})")
    b, nq, nk, h, d = shape.batch, shape.q_len, shape.kv_len, shape.heads, shape.head_dim
    dp = -(-d // FRAGMENT) * FRAGMENT  # head dimension padded to whole fragments
    BM, BN, NW = BLOCK_M, BLOCK_N, WARPS
    NT = NW * 32
    vw = _vector_width(d)
    dv = dp // vw  # vectors per padded row
    n_qt = -(-nq // BM)
    n_kt = -(-nk // BN)
    # every loop below covers its tile exactly: BM, BN are 64 and dv, dp even, so BM * dv % NT == 0
    ld_iters = BM * dv // NT
    kv_iters = BN * dv // NT
    upd_iters = BM * dp // NT
    scale_f = float(scale)
    NEG = NEG_INF
    # Static plus dynamic shared memory over 48 KiB needs the kernel's dynamic-size attribute raised,
    # which the TVM runtime does only for a dynamic part of 48 KiB or more: pad the P tile to that.
    static_bytes = 4 * (BM * max(BN, dp) + 3 * BM)
    dynamic_bytes = 2 * (BM * dp + 2 * BN * dp + BM * BN)
    p_rows = BM
    if static_bytes + dynamic_bytes > SHARED_STATIC_LIMIT:
        p_rows = max(BM, -(-SHARED_STATIC_LIMIT // (2 * BN)))

    # fmt: off
    @T.prim_func(private=True)
    def flash(q: T.Buffer((b, nq, h, d), "float16"), k: T.Buffer((b, nk, h, d), "float16"),
              v: T.Buffer((b, nk, h, d), "float16"), o: T.Buffer((b, nq, h, d), "float16")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        bx = T.launch_thread("blockIdx.x", n_qt)
        by = T.launch_thread("blockIdx.y", b * h)
        tx = T.launch_thread("threadIdx.x", 32)
        ty = T.launch_thread("threadIdx.y", NW)
        qs = T.decl_buffer((BM, dp), "float16", scope="shared.dyn")
        ks = T.decl_buffer((BN, dp), "float16", scope="shared.dyn")
        vs = T.decl_buffer((BN, dp), "float16", scope="shared.dyn")
        sbuf = T.decl_buffer((BM * max(BN, dp),), "float32", scope="shared")
        ss = T.decl_buffer((BM, BN), "float32", data=sbuf.data, scope="shared")
        ts = T.decl_buffer((BM, dp), "float32", data=sbuf.data, scope="shared")
        ps = T.decl_buffer((p_rows, BN), "float16", scope="shared.dyn")
        acc = T.decl_buffer((upd_iters,), "float32", scope="local")
        alpha_s = T.decl_buffer((BM,), "float32", scope="shared")
        lsum = T.decl_buffer((2, BM), "float32", scope="shared")
        qf = T.decl_buffer((16, dp), "float16", scope="wmma.matrix_a")
        kf = T.decl_buffer((16, 16), "float16", scope="wmma.matrix_b")
        sf = T.decl_buffer((16, BN), "float32", scope="wmma.accumulator")
        pf = T.decl_buffer((16, BN), "float16", scope="wmma.matrix_a")
        vf = T.decl_buffer((16, 16), "float16", scope="wmma.matrix_b")
        of = T.decl_buffer((16, dp), "float32", scope="wmma.accumulator")
        m_r = T.decl_buffer((1,), "float32", scope="local")
        l_r = T.decl_buffer((1,), "float32", scope="local")
        mx = T.decl_buffer((1,), "float32", scope="local")
        al = T.decl_buffer((1,), "float32", scope="local")
        psum = T.decl_buffer((1,), "float32", scope="local")
        pv = T.decl_buffer((1,), "float32", scope="local")
        bb = by // h
        hh = by % h
        t = ty * 32 + tx
        r = t % BM
        half = t // BM
        # Q tile, zero-padded to dp columns and BM rows
        for it in range(ld_iters):
            if bx * BM + (it * NT + t) // dv < nq and (it * NT + t) % dv * vw < d:
                for j in T.vectorized(vw):
                    qs[(it * NT + t) // dv, (it * NT + t) % dv * vw + j] = q[bb, bx * BM + (it * NT + t) // dv, hh, (it * NT + t) % dv * vw + j]
            else:
                for j in T.vectorized(vw):
                    qs[(it * NT + t) // dv, (it * NT + t) % dv * vw + j] = T.float16(0)
        for it0 in range(upd_iters):
            acc[it0] = T.float32(0)
        m_r[0] = T.float32(NEG)
        l_r[0] = T.float32(0)
        T.tvm_storage_sync("shared.dyn")
        for kk in range(dp // 16):
            T.tvm_load_matrix_sync(qf.data, 16, 16, 16, kk, qs.access_ptr("r", offset=ty * 16 * dp + kk * 16), dp, "row_major")
        for kt in range(n_kt):
            for it2 in range(kv_iters):
                if kt * BN + (it2 * NT + t) // dv < nk and (it2 * NT + t) % dv * vw < d:
                    for j in T.vectorized(vw):
                        ks[(it2 * NT + t) // dv, (it2 * NT + t) % dv * vw + j] = k[bb, kt * BN + (it2 * NT + t) // dv, hh, (it2 * NT + t) % dv * vw + j]
                    for j in T.vectorized(vw):
                        vs[(it2 * NT + t) // dv, (it2 * NT + t) % dv * vw + j] = v[bb, kt * BN + (it2 * NT + t) // dv, hh, (it2 * NT + t) % dv * vw + j]
                else:
                    for j in T.vectorized(vw):
                        ks[(it2 * NT + t) // dv, (it2 * NT + t) % dv * vw + j] = T.float16(0)
                    for j in T.vectorized(vw):
                        vs[(it2 * NT + t) // dv, (it2 * NT + t) % dv * vw + j] = T.float16(0)
            T.tvm_storage_sync("shared.dyn")
            for jn in range(BN // 16):
                T.tvm_fill_fragment(sf.data, 16, 16, 16, jn, T.float32(0))
                for kk in range(dp // 16):
                    T.tvm_load_matrix_sync(kf.data, 16, 16, 16, 0, ks.access_ptr("r", offset=jn * 16 * dp + kk * 16), dp, "col_major")
                    T.tvm_mma_sync(sf.data, jn, qf.data, kk, kf.data, 0, sf.data, jn)
                T.tvm_store_matrix_sync(sf.data, 16, 16, 16, jn, ss.access_ptr("w", offset=ty * 16 * BN + jn * 16), BN, "row_major")
            T.tvm_storage_sync("shared.dyn")
            mx[0] = m_r[0]
            for jj in range(BN):
                mx[0] = T.max(mx[0], T.if_then_else(kt * BN + (jj + r) % BN < nk, ss[r, (jj + r) % BN] * T.float32(scale_f), T.float32(NEG)))
            al[0] = T.exp(m_r[0] - mx[0])
            psum[0] = T.float32(0)
            for jj in range(BN // 2):
                pv[0] = T.if_then_else(kt * BN + half * (BN // 2) + (jj + r) % (BN // 2) < nk, T.exp(ss[r, half * (BN // 2) + (jj + r) % (BN // 2)] * T.float32(scale_f) - mx[0]), T.float32(0))
                ps[r, half * (BN // 2) + (jj + r) % (BN // 2)] = T.Cast("float16", pv[0])
                psum[0] = psum[0] + pv[0]
            l_r[0] = l_r[0] * al[0] + psum[0]
            m_r[0] = mx[0]
            if half == 0:
                alpha_s[r] = al[0]
            T.tvm_storage_sync("shared.dyn")
            for kk in range(BN // 16):
                T.tvm_load_matrix_sync(pf.data, 16, 16, 16, kk, ps.access_ptr("r", offset=ty * 16 * BN + kk * 16), BN, "row_major")
            for cn in range(dp // 16):
                T.tvm_fill_fragment(of.data, 16, 16, 16, cn, T.float32(0))
                for kk in range(BN // 16):
                    T.tvm_load_matrix_sync(vf.data, 16, 16, 16, 0, vs.access_ptr("r", offset=kk * 16 * dp + cn * 16), dp, "row_major")
                    T.tvm_mma_sync(of.data, cn, pf.data, kk, vf.data, 0, of.data, cn)
                T.tvm_store_matrix_sync(of.data, 16, 16, 16, cn, ts.access_ptr("w", offset=ty * 16 * dp + cn * 16), dp, "row_major")
            T.tvm_storage_sync("shared.dyn")
            for it3 in range(upd_iters):
                acc[it3] = acc[it3] * alpha_s[(it3 * NT + t) // dp] + ts[(it3 * NT + t) // dp, (it3 * NT + t) % dp]
        lsum[half, r] = l_r[0]
        T.tvm_storage_sync("shared.dyn")
        for it4 in range(upd_iters):
            if bx * BM + (it4 * NT + t) // dp < nq and (it4 * NT + t) % dp < d:
                o[bb, bx * BM + (it4 * NT + t) // dp, hh, (it4 * NT + t) % dp] = T.Cast("float16", acc[it4] / (lsum[0, (it4 * NT + t) // dp] + lsum[1, (it4 * NT + t) // dp]))

    # fmt: on
    return flash


def reference_attention_kernel(shape: AttentionShape, scale: float) -> tirx.PrimFunc:
    """The same computation as :func:`flash_attention_kernel` written plainly in TE (scores materialised),
    for targets without tensor cores and to check :class:`FlashAttention`'s rewrite anywhere."""
    b, nq, nk, h, d = shape.batch, shape.q_len, shape.kv_len, shape.heads, shape.head_dim
    q = te.placeholder((b, nq, h, d), "float16", name="q")
    k = te.placeholder((b, nk, h, d), "float16", name="k")
    v = te.placeholder((b, nk, h, d), "float16", name="v")
    rd = te.reduce_axis((0, d), name="rd")
    dot = te.compute(
        (b, h, nq, nk),
        lambda i, j, m, n: te.sum(q[i, m, j, rd].astype("float32") * k[i, n, j, rd].astype("float32"), axis=rd),
        name="dot",
    )
    rn = te.reduce_axis((0, nk), name="rn")
    mx = te.compute((b, h, nq), lambda i, j, m: te.max(dot[i, j, m, rn], axis=rn), name="row_max")
    f32_scale = tirx.const(scale, "float32")
    e = te.compute((b, h, nq, nk), lambda i, j, m, n: te.exp((dot[i, j, m, n] - mx[i, j, m]) * f32_scale), name="exp")
    rs = te.reduce_axis((0, nk), name="rs")
    total = te.compute((b, h, nq), lambda i, j, m: te.sum(e[i, j, m, rs], axis=rs), name="row_sum")
    p = te.compute((b, h, nq, nk), lambda i, j, m, n: (e[i, j, m, n] / total[i, j, m]).astype("float16"), name="probs")
    rv = te.reduce_axis((0, nk), name="rv")
    acc = te.compute(
        (b, nq, h, d),
        lambda i, m, j, c: te.sum(p[i, j, m, rv].astype("float32") * v[i, rv, j, c].astype("float32"), axis=rv),
        name="weighted",
    )
    o = te.compute((b, nq, h, d), lambda *i: acc[i].astype("float16"), name="attention")
    return te.create_prim_func([q, k, v, o]).without_attr("global_symbol")


def supports_flash_attention(target: tvm.target.Target) -> bool:
    """True for targets :func:`flash_attention_kernel` runs on: CUDA with tensor cores (sm_80+)."""
    return sm_version(target) >= MIN_SM


KernelFactory = Callable[[AttentionShape, float], tirx.PrimFunc]


@dataclass(frozen=True)
class _Match:
    """One attention found in the graph: its ``[B, N, H, D]`` inputs, scale and shape."""

    q: relax.Expr
    k: relax.Expr
    v: relax.Expr
    scale: float
    shape: AttentionShape


class _Walker:
    """Follows a value back through the bindings of one function."""

    def __init__(self, func: relax.Function) -> None:
        self.values = relax.analysis.get_var2val(func)

    def value(self, expr: Any) -> Any:
        while isinstance(expr, relax.Var) and expr in self.values:
            expr = self.values[expr]
        return expr

    def through(self, expr: Any, ops: tuple[str, ...]) -> tuple[Any, Any]:
        """Skip calls of ``ops`` (first argument) back from ``expr``: ``(expr reached, its value)``."""
        value = self.value(expr)
        while op_name(value) in ops:
            expr = value.args[0]
            value = self.value(expr)
        return expr, value

    def scalar(self, expr: Any) -> float | None:
        """The value of a scalar constant, possibly cast, else None."""
        value = self.value(expr)
        if op_name(value) == "relax.astype":
            value = self.value(value.args[0])
        if isinstance(value, tvm.ir.expr.Constant) and value.value.numpy().size == 1:
            return float(value.value.numpy().reshape(()))
        return None

    def heads_view(self, expr: Any, perm: list[int]) -> tuple[Any, float] | None:
        """For ``expr`` = permutes (composing to ``perm``) and scalar multiplies of a 4-D tensor ``x``:
        ``(x, product of the scalars)``; else None. ``expr`` itself is first followed back through
        reshapes and broadcasts that only split or merge the batch and head axes."""
        expr, value = self.through(expr, ("relax.reshape", "relax.broadcast_to"))
        scale, axes = 1.0, list(range(4))  # expr's axis i is x's axis axes[i]
        while True:
            name = op_name(value)
            if name == "relax.multiply" and (c := self.scalar(value.args[1])) is not None:
                scale *= c
            elif name == "relax.permute_dims" and value.attrs.axes is not None:
                axes = [[int(a) for a in value.attrs.axes][i] for i in axes]
            else:
                break
            expr = value.args[0]
            value = self.value(expr)
        if axes != perm or len(expr.ty.shape) != 4 or str(expr.ty.dtype) != "float16":
            return None
        return expr, scale


def _static(shape: Any) -> list[int] | None:
    try:
        return [int(x) for x in shape]
    except TypeError:
        return None


def match_attention(walker: _Walker, call: relax.Call) -> _Match | None:
    """``matmul(softmax(matmul(q', k') * c), v')`` where q', k', v' are head transposes of
    ``[B, N, H, D]`` float16 tensors, else None."""
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
    q = walker.heads_view(scores.args[0], [0, 2, 1, 3])
    k = walker.heads_view(scores.args[1], [0, 2, 3, 1])
    v = walker.heads_view(call.args[1], [0, 2, 1, 3])
    if q is None or k is None or v is None:
        return None
    qs, ks, vs = (_static(x[0].ty.shape) for x in (q, k, v))
    if qs is None or ks is None or vs is None or ks != vs or qs[0] != ks[0] or qs[2:] != ks[2:]:
        return None
    shape = AttentionShape(qs[0], qs[1], ks[1], qs[2], qs[3])
    if not shape.supported():
        return None
    return _Match(q[0], k[0], v[0], scale * q[1] * k[1] * v[1], shape)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, kernel: KernelFactory) -> None:
        super().__init__(mod)
        self.kernel = kernel
        self.walker: _Walker | None = None
        self.kernels: dict[tuple[AttentionShape, float], tvm.ir.GlobalVar] = {}
        self.outputs: dict[relax.Call, relax.Var] = {}  # attention matmul -> its kernel call's output
        self.rewritten = 0

    def visit_function_(self, func: relax.Function) -> relax.Expr:
        self.walker = _Walker(func)
        return super().visit_function_(func)

    def _kernel(self, shape: AttentionShape, scale: float) -> tvm.ir.GlobalVar:
        key = (shape, scale)
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(self.kernel(shape, scale), "flash_attention")
        return self.kernels[key]

    def _heads_last(self, call: relax.Call) -> relax.Var | None:
        """For permutes that move the attention's ``[B, H, N, D]`` output (reshaped, maybe cast) back to
        ``[B, N, H, D]``, torch's transpose after attention: the kernel's output, which is that already."""
        if self.walker is None or op_name(call) != "relax.permute_dims" or str(call.ty.dtype) != "float16":
            return None
        axes, value = list(range(4)), call
        while op_name(value) == "relax.permute_dims" and value.attrs.axes is not None:
            if len(value.attrs.axes) != 4:
                return None
            axes = [int(value.attrs.axes[i]) for i in axes]
            _, value = self.walker.through(value.args[0], ())
        if axes != [0, 2, 1, 3]:
            return None
        _, value = self.walker.through(value, ("relax.astype", "relax.reshape"))
        out = self.outputs.get(value)
        if out is None or _static(call.ty.shape) != _static(out.ty.shape):
            return None
        return out

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if (out := self._heads_last(call)) is not None:
            return out
        found = match_attention(self.walker, call) if self.walker is not None else None
        if found is None:
            return super().visit_call_(call)
        s = found.shape
        args = [self.visit_expr(x) for x in (found.q, found.k, found.v)]
        out = self.builder_.emit(
            relax.call_tir(
                self._kernel(s, found.scale), args, relax.TensorType((s.batch, s.q_len, s.heads, s.head_dim), "float16")
            )
        )
        self.rewritten += 1
        self.outputs[call] = out
        # back to the matmul's [B * H, N, D] (or [B, H, N, D]); the head transposes that follow cancel
        heads_first = relax.op.permute_dims(out, [0, 2, 1, 3])
        result = relax.op.reshape(heads_first, [int(x) for x in call.ty.shape])
        return relax.op.astype(result, str(call.ty.dtype))


@tvm.transform.module_pass(opt_level=0, name="mlcweb.FlashAttention")
class FlashAttention(ModulePassBase):
    """Replace each float16 ``softmax(Q @ K^T * scale) @ V`` over head transposes with one call of a
    flash-attention kernel (``kernel``: :func:`flash_attention_kernel` by default, CUDA sm_70+), reading
    Q, K and V as the ``[B, N, H, D]`` tensors the transposes started from."""

    def __init__(self, kernel: KernelFactory | None = None) -> None:
        self.kernel = kernel or flash_attention_kernel

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Rewriter(mod, self.kernel)
        result = rewrite_and_clean(mod, rewriter)
        if rewriter.rewritten:
            log.info("%d attentions became flash-attention kernels", rewriter.rewritten)
        return result

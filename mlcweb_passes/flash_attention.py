"""Flash attention: ``softmax(Q @ K^T * scale) @ V`` in one CUDA kernel on tensor cores.

Stable Diffusion's self-attention at 64x64 latents has 4096 tokens: unfused, each head's 4096x4096 score
matrix is written by one kernel and read back by the softmax and by ``P @ V``, 512 MiB a layer for the
UNet's batch of two with eight heads. :func:`flash_attention_kernel` is one hand-written TIR kernel that
never stores the scores. Each thread block takes one or two 16-row query tiles of one head per warp (4
or 8 warps, by :func:`choose_flash_tile`) and walks the keys 64 to 256 at a time, as FlashAttention-2
does (Dao, 2023):

1. the block's Q tile is copied to shared memory once and loaded into ``mma.sync`` A operands
   (``ldmatrix``); each K/V tile is copied in 16-byte vectors, the head dimension zero-padded to a
   multiple of 16 and rows past the sequence zero-filled; the next tile's copy is loaded into registers
   while the current one is computed;
2. each warp computes its tiles' slice of ``Q @ K^T`` with ``mma.sync.m16n8k16`` (float16 in, float32
   accumulators) into registers; each K operand loaded from shared memory serves every tile of the warp;
3. the online softmax runs on those registers: each thread holds two rows' values, the four threads of
   a quad exchange row maxima with warp shuffles, the maximum is taken over the raw scores so that each
   probability is ``exp2(s * scale * log2(e) - m)``, one fused multiply-add and one ``exp2``, and the
   running output is rescaled by ``exp2(m_old - m_new)``;
4. the probabilities, cast to float16, are already in the A-operand layout of ``P @ V`` (the
   accumulator layout of m16n8 pairs), which adds the tile's share to the output accumulators (8-wide
   output blocks that hold only padding are skipped);
5. at the end each row is divided by its sum and written as float16 in the input's ``[B, N, H, D]``
   layout.

Shared memory rows are padded by 8 halves so ``ldmatrix``'s eight row addresses hit distinct banks.
Inputs and output are ``[batch, seq, heads, head_dim]`` float16, the layout attention's projections
produce before torch's head transposes, so :class:`FlashAttention` removes the transposes too.

:class:`FlashAttention` is the Relax pass: it finds ``matmul -> [scale] -> softmax -> matmul`` over head
transposes (as torch.export and :class:`~mlcweb_passes.MixedPrecision` leave SDPA) and calls the kernel.
Masked attention (an added mask, e.g. CLIP's causal one) and head dimensions over
:data:`MAX_HEAD_DIM` (the VAE's single 512-wide head) are left to the unfused path.
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

from ._base import Bindings, ModulePassBase, op_name, rewrite_and_clean, static_shape
from .default_schedule import HAND_WRITTEN, SOURCE_ATTR
from .tensor_core_matmul import sm_version

__all__ = [
    "MAX_HEAD_DIM",
    "AttentionShape",
    "FlashAttention",
    "choose_flash_tile",
    "flash_attention_kernel",
    "match_attention",
    "reference_attention_kernel",
    "supports_flash_attention",
]

log = logging.getLogger(__name__)

BLOCK_N = 64  # keys per step
WARPS = 4
MAX_HEAD_DIM = 160  # output accumulators live in registers: 160 / 8 * 4 = 80 floats a thread
NEG_INF = -1e30  # finite: exp2(NEG_INF - m) is 0 without inf - inf
MIN_SM = 80  # mma.sync.m16n8k16 with float32 accumulators, ldmatrix

# How the kernel finds Q, K and V: for each, None (its own [B, N, H, D] tensor) or (count, index), part
# `index` of a [B, N, count, H, D] tensor (projections merged into one GEMM)
Views = tuple[tuple[int, int] | None, tuple[int, int] | None, tuple[int, int] | None]
NO_VIEWS: Views = (None, None, None)


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


def choose_flash_tile(shape: AttentionShape) -> tuple[int, int, int]:
    """``(warps, block_n, m_tiles)`` for ``shape``, a rule from ``benchmarks/flash_attention.py --variants``
    on an H100 (``results/2026-11-24-h100-flash_attention-4-two-row-tiles.md``). Each warp takes
    ``m_tiles`` 16-row query tiles; every K/V operand it loads from shared memory then serves all of them.

    - Self-attention of 1024 tokens or more, heads up to 48 wide: 8 warps of two tiles (256 query rows)
      over 128-key steps. SD's 64x64 latents (40-wide heads): 0.237 -> 0.199 ms. Wider heads would need
      more registers for two tiles' outputs than a thread has.
    - The same up to 80 wide: 8 warps of one tile over 256-key steps (32x32 latents: 0.035 -> 0.031 ms
      against 4 warps over 64 keys).
    - Otherwise 4 warps of one tile over 64 keys: shorter sequences have too few large blocks to fill the
      GPU, and wider heads were not measured."""
    long = shape.q_len >= 1024 and shape.kv_len >= 1024
    if long and shape.head_dim <= 48 and _tile_fits(shape.head_dim, 8, 128):
        return 8, 128, 2
    if long and shape.head_dim <= 80 and _tile_fits(shape.head_dim, 8, 256):
        return 8, 256, 1
    return WARPS, BLOCK_N, 1


def _tile_fits(head_dim: int, warps: int, block_n: int) -> bool:
    """Whether ``warps`` warps copy ``block_n``-key K/V tiles in whole 16-byte vectors (the Q tile of
    ``16 * warps`` rows always splits: a padded row is an even number of vectors)."""
    dv = -(-head_dim // 16) * 16 // _vector_width(head_dim)
    return block_n * dv % (32 * warps) == 0 and block_n % 16 == 0


def flash_attention_kernel(
    shape: AttentionShape,
    scale: float,
    warps: int | None = None,
    block_n: int | None = None,
    m_tiles: int | None = None,
    views: Views = NO_VIEWS,
) -> tirx.PrimFunc:
    """The kernel ``o = softmax(q @ k^T * scale) @ v`` for ``shape`` (float16 in and out, float32 inside),
    marked ``tirx.is_scheduled`` so schedule rules leave it alone. CUDA sm_80+ (``mma.sync``).

    A thread block of ``warps`` warps takes ``16 * m_tiles * warps`` query rows and walks the keys
    ``block_n`` at a time (all three by default :func:`choose_flash_tile`'s).

    ``views``: for each of Q, K, V, None (a ``[B, N, H, D]`` tensor) or ``(count, index)``: the input is a
    ``[B, N, count, H, D]`` tensor of which the kernel reads part ``index`` (projections merged by
    :class:`~mlcweb_passes.MergeProjections`, read where they are instead of split out)."""
    if not shape.supported():
        raise ValueError(f"flash attention does not support {shape} (head_dim must be 1..{MAX_HEAD_DIM})")
    b, nq, nk, h, d = shape.batch, shape.q_len, shape.kv_len, shape.heads, shape.head_dim
    if len(views) != 3 or any(view is not None and not 0 <= view[1] < view[0] for view in views):
        raise ValueError(f"views must be three None or (count, index) with index < count, not {views}")
    q_shape, k_shape, v_shape = (
        (b, n, view[0], h, d) if view is not None else (b, n, h, d) for view, n in zip(views, (nq, nk, nk), strict=True)
    )
    dp = -(-d // 16) * 16  # head dimension padded to whole 16-wide MMA steps
    row = dp + 8  # shared-memory row stride in halves: ldmatrix's 8 rows then hit distinct banks
    chosen = choose_flash_tile(shape)
    nw, bn, mt = warps or chosen[0], block_n or chosen[1], m_tiles or chosen[2]
    if not _tile_fits(d, nw, bn):
        raise ValueError(f"{nw} warps cannot copy {bn}-key tiles of head dimension {d} in whole vectors")
    bm, nt = 16 * nw * mt, nw * 32
    vw = _vector_width(d)
    dv = dp // vw  # vectors per padded row
    copies = bm * dv // nt  # every thread's share of the Q tile (dv is even, so this is exact)
    kv_copies = bn * dv // nt  # ... and of a K or V tile
    kd, nd = dp // 16, dp // 8  # MMA steps along the head dimension; 8-wide output blocks
    nv = -(-d // 8)  # output blocks holding columns below d: P @ V skips the last one when it is padding
    nj = bn // 8  # 8-wide score blocks per key tile
    n_qt, n_kt = -(-nq // bm), -(-nk // bn)
    log2e = 1.4426950408889634
    scale2 = float(scale) * log2e  # scores are kept in base 2: exp2(s * scale2 - m)
    neg = NEG_INF
    full = tirx.const(0xFFFFFFFF, "uint32")

    mma = ("m16n8k16", "row", "col", "fp16", "fp16", "fp32")  # ptx mma.sync, float32 accumulators

    # Index helpers, expanded in place: TVMScript turns assigned names into mutable locals, and a vector
    # copy whose index reads one becomes a gather.
    def copy_row(i: Any, t: Any) -> Any:  # the tile row of thread t's i-th 16-byte copy
        return (i * nt + t) // dv

    def copy_col(i: Any, t: Any) -> Any:
        return (i * nt + t) % dv * vw

    def at(buf: Any, which: int, bb: Any, r: Any, hh: Any, c: Any) -> Any:  # row r, head hh, column c of Q/K/V
        view = views[which]
        return buf[bb, r, view[1], hh, c] if view is not None else buf[bb, r, hh, c]

    def score(mi: Any, j: Any, r: Any, e: Any) -> Any:  # key column j * 8 + tig * 2 + e, row g + 8 * r of tile mi
        return (mi * nj + j) * 4 + r * 2 + e

    def out(mi: Any, nb: Any, r: Any, e: Any) -> Any:  # output column nb * 8 + tig * 2 + e, row g + 8 * r of tile mi
        return (mi * nd + nb) * 4 + r * 2 + e

    # fmt: off
    @T.prim_func(private=True)
    def flash(q: T.Buffer(q_shape, "float16"), k: T.Buffer(k_shape, "float16"),  # type: ignore[valid-type,no-untyped-def]
              v: T.Buffer(v_shape, "float16"), o: T.Buffer((b, nq, h, d), "float16")):  # type: ignore[valid-type]
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        bx = T.launch_thread("blockIdx.x", n_qt)
        by = T.launch_thread("blockIdx.y", b * h)
        tx = T.launch_thread("threadIdx.x", 32)
        ty = T.launch_thread("threadIdx.y", nw)
        qs = T.decl_buffer((bm * row,), "float16", scope="shared.dyn")
        ks = T.decl_buffer((bn * row,), "float16", scope="shared.dyn")
        vs = T.decl_buffer((bn * row,), "float16", scope="shared.dyn")
        qa = T.decl_buffer((mt * kd * 8,), "float16", scope="local")  # Q as MMA A operands: tile, 16-wide step
        kr = T.decl_buffer((kv_copies * vw,), "float16", scope="local")  # the next K tile's share, in flight
        vr = T.decl_buffer((kv_copies * vw,), "float16", scope="local")
        kb = T.decl_buffer((8,), "float16", scope="local")  # two 8-key B operands of Q @ K^T
        vb = T.decl_buffer((8,), "float16", scope="local")  # two 8-wide B operands of P @ V
        sc = T.decl_buffer((mt * nj * 4,), "float32", scope="local")  # scores: rows g, g + 8 of each tile
        pa = T.decl_buffer((mt * nj * 4,), "float16", scope="local")  # the same as A operands of P @ V
        acc = T.decl_buffer((mt * nd * 4,), "float32", scope="local")  # output rows g, g + 8 of each tile
        m_r = T.decl_buffer((mt * 2,), "float32", scope="local")  # running max (base 2) of those rows
        l_r = T.decl_buffer((mt * 2,), "float32", scope="local")  # this thread's share of the running sums
        mx = T.decl_buffer((1,), "float32", scope="local")
        alpha = T.decl_buffer((1,), "float32", scope="local")
        bb = by // h
        hh = by % h
        t = ty * 32 + tx
        g = tx // 4  # the quad (4 threads) of an MMA row
        tig = tx % 4
        # Q tile -> shared, zero-padded: thread t copies vectors t, t + nt, ... of the bm x dp tile
        for i in T.unroll(copies):
            if bx * bm + copy_row(i, t) < nq and copy_col(i, t) < d:
                for j in T.vectorized(vw):
                    qs[copy_row(i, t) * row + copy_col(i, t) + j] = at(q, 0, bb, bx * bm + copy_row(i, t), hh,
                                                                         copy_col(i, t) + j)
            else:
                for j in T.vectorized(vw):
                    qs[copy_row(i, t) * row + copy_col(i, t) + j] = T.float16(0)
        for i0 in T.unroll(mt * nd * 4):
            acc[i0] = T.float32(0)
        for r0 in T.unroll(mt * 2):
            m_r[r0] = T.float32(neg)
            l_r[r0] = T.float32(0)
        T.tvm_storage_sync("shared.dyn")
        # ldmatrix x4: lanes 0-15 address rows 0-15 of a 16-row tile of the warp, lanes 16-31 the next 8 columns
        for mi in T.unroll(mt):
            for kk in T.unroll(kd):
                T.ptx_legacy.ldmatrix(False, 4, ".b16", qa.data, (mi * kd + kk) * 8, qs.access_ptr("r"),
                                      ((ty * mt + mi) * 16 + tx % 16) * row + kk * 16 + tx // 16 * 8,
                                      dtype="float16")
        # K/V tile 0 into registers; each step stores the tile it holds and loads the next one, so the
        # global loads are in flight during the step's tensor-core work
        for i1 in T.unroll(kv_copies):
            if copy_row(i1, t) < nk and copy_col(i1, t) < d:
                for j in T.vectorized(vw):
                    kr[i1 * vw + j] = at(k, 1, bb, copy_row(i1, t), hh, copy_col(i1, t) + j)
                for j in T.vectorized(vw):
                    vr[i1 * vw + j] = at(v, 2, bb, copy_row(i1, t), hh, copy_col(i1, t) + j)
            else:
                for j in T.vectorized(vw):
                    kr[i1 * vw + j] = T.float16(0)
                for j in T.vectorized(vw):
                    vr[i1 * vw + j] = T.float16(0)
        for kt in range(n_kt):
            T.tvm_storage_sync("shared.dyn")
            for i4 in T.unroll(kv_copies):
                for j in T.vectorized(vw):
                    ks[copy_row(i4, t) * row + copy_col(i4, t) + j] = kr[i4 * vw + j]
                for j in T.vectorized(vw):
                    vs[copy_row(i4, t) * row + copy_col(i4, t) + j] = vr[i4 * vw + j]
            T.tvm_storage_sync("shared.dyn")
            for i5 in T.unroll(kv_copies):
                if (kt + 1) * bn + copy_row(i5, t) < nk and copy_col(i5, t) < d:
                    for j in T.vectorized(vw):
                        kr[i5 * vw + j] = at(k, 1, bb, (kt + 1) * bn + copy_row(i5, t), hh, copy_col(i5, t) + j)
                    for j in T.vectorized(vw):
                        vr[i5 * vw + j] = at(v, 2, bb, (kt + 1) * bn + copy_row(i5, t), hh, copy_col(i5, t) + j)
                else:
                    for j in T.vectorized(vw):
                        kr[i5 * vw + j] = T.float16(0)
                    for j in T.vectorized(vw):
                        vr[i5 * vw + j] = T.float16(0)
            # S = Q @ K^T: each 16-row tile of the warp by bn keys. K rows are the B operand's columns, so
            # ldmatrix without .trans; one x4 load gives the operands of two 8-key blocks, used by every tile.
            for i2 in T.unroll(mt * nj * 4):
                sc[i2] = T.float32(0)
            for jp in T.unroll(nj // 2):
                for kk in T.unroll(kd):
                    T.ptx_legacy.ldmatrix(False, 4, ".b16", kb.data, 0, ks.access_ptr("r"),
                                          (jp * 16 + tx % 8 + tx // 16 * 8) * row + kk * 16 + tx // 8 % 2 * 8,
                                          dtype="float16")
                    for mi in T.unroll(mt):
                        T.ptx_legacy.mma(*mma, qa.data, (mi * kd + kk) * 8, kb.data, 0, sc.data,
                                         score(mi, jp * 2, 0, 0), False, dtype="float32")
                        T.ptx_legacy.mma(*mma, qa.data, (mi * kd + kk) * 8, kb.data, 4, sc.data,
                                         score(mi, jp * 2 + 1, 0, 0), False, dtype="float32")
            # online softmax of rows g (r = 0) and g + 8 (r = 1); the 4 threads of a quad share a row. The
            # maximum is taken over raw scores (scale > 0) so that each exponent is one fused multiply-add.
            for mi in T.unroll(mt):
                for r in T.unroll(2):
                    mx[0] = T.float32(neg)
                    for j in T.unroll(nj):
                        for e in T.unroll(2):
                            sc[score(mi, j, r, e)] = T.if_then_else(kt * bn + j * 8 + tig * 2 + e < nk,
                                                                    sc[score(mi, j, r, e)], T.float32(neg))
                            mx[0] = T.max(mx[0], sc[score(mi, j, r, e)])
                    mx[0] = T.max(mx[0], T.tvm_warp_shuffle_xor(full, mx[0], 1, 32, 32))
                    mx[0] = T.max(mx[0], T.tvm_warp_shuffle_xor(full, mx[0], 2, 32, 32))
                    mx[0] = T.max(m_r[mi * 2 + r], mx[0] * T.float32(scale2))
                    alpha[0] = T.exp2(m_r[mi * 2 + r] - mx[0])
                    m_r[mi * 2 + r] = mx[0]
                    l_r[mi * 2 + r] = l_r[mi * 2 + r] * alpha[0]
                    for j1 in T.unroll(nj):
                        for e1 in T.unroll(2):
                            sc[score(mi, j1, r, e1)] = T.exp2(sc[score(mi, j1, r, e1)] * T.float32(scale2) - mx[0])
                            l_r[mi * 2 + r] = l_r[mi * 2 + r] + sc[score(mi, j1, r, e1)]
                    for nb in T.unroll(nv):
                        for e2 in T.unroll(2):
                            acc[out(mi, nb, r, e2)] = acc[out(mi, nb, r, e2)] * alpha[0]
            # the scores' accumulator layout is the A-operand layout of P @ V: cast in place
            for i3 in T.unroll(mt * nj * 4):
                pa[i3] = T.Cast("float16", sc[i3])
            # O += P @ V: V rows are the B operand's rows, so ldmatrix .trans; x4 covers two 8-wide blocks,
            # x2 the last one when the head dimension ends inside a 16-wide pair
            for cp in T.unroll(nv // 2):
                for kk in T.unroll(bn // 16):
                    T.ptx_legacy.ldmatrix(True, 4, ".b16", vb.data, 0, vs.access_ptr("r"),
                                          (kk * 16 + tx % 8 + tx // 8 % 2 * 8) * row + cp * 16 + tx // 16 * 8,
                                          dtype="float16")
                    for mi in T.unroll(mt):
                        T.ptx_legacy.mma(*mma, pa.data, score(mi, kk * 2, 0, 0), vb.data, 0, acc.data,
                                         out(mi, cp * 2, 0, 0), False, dtype="float32")
                        T.ptx_legacy.mma(*mma, pa.data, score(mi, kk * 2, 0, 0), vb.data, 4, acc.data,
                                         out(mi, cp * 2 + 1, 0, 0), False, dtype="float32")
            for cp1 in T.unroll(nv % 2):
                for kk in T.unroll(bn // 16):
                    T.ptx_legacy.ldmatrix(True, 2, ".b16", vb.data, 0, vs.access_ptr("r"),
                                          (kk * 16 + tx % 16) * row + (nv // 2 + cp1) * 16, dtype="float16")
                    for mi in T.unroll(mt):
                        T.ptx_legacy.mma(*mma, pa.data, score(mi, kk * 2, 0, 0), vb.data, 0, acc.data,
                                         out(mi, nv - 1, 0, 0), False, dtype="float32")
        # the row sums are split over the quad; divide and store the columns below d
        for mi in T.unroll(mt):
            for r1 in T.unroll(2):
                l_r[mi * 2 + r1] = l_r[mi * 2 + r1] + T.tvm_warp_shuffle_xor(full, l_r[mi * 2 + r1], 1, 32, 32)
                l_r[mi * 2 + r1] = l_r[mi * 2 + r1] + T.tvm_warp_shuffle_xor(full, l_r[mi * 2 + r1], 2, 32, 32)
                for nb1 in T.unroll(nv):
                    for e3 in T.unroll(2):
                        if (bx * bm + (ty * mt + mi) * 16 + r1 * 8 + g < nq
                                and nb1 * 8 + tig * 2 + e3 < d):
                            o[bb, bx * bm + (ty * mt + mi) * 16 + r1 * 8 + g, hh, nb1 * 8 + tig * 2 + e3] = T.Cast(
                                "float16", acc[out(mi, nb1, r1, e3)] / l_r[mi * 2 + r1])
    # fmt: on
    return flash.with_attr(SOURCE_ATTR, HAND_WRITTEN)


def _view(name: str, b: int, n: int, h: int, d: int, view: tuple[int, int] | None) -> tuple[te.Tensor, te.Tensor]:
    """A ``[B, N, H, D]`` input: the placeholder and the tensor read (part ``index`` of a
    ``[B, N, count, H, D]`` placeholder for ``view = (count, index)``)."""
    if view is None:
        x = te.placeholder((b, n, h, d), "float16", name=name)
        return x, x
    whole = te.placeholder((b, n, view[0], h, d), "float16", name=name)
    return whole, te.compute((b, n, h, d), lambda i, m, j, c: whole[i, m, view[1], j, c], name=f"{name}_part")


def reference_attention_kernel(shape: AttentionShape, scale: float, views: Views = NO_VIEWS) -> tirx.PrimFunc:
    """The same computation as :func:`flash_attention_kernel` written plainly in TE (scores materialised),
    for targets without tensor cores and to check :class:`FlashAttention`'s rewrite anywhere."""
    b, nq, nk, h, d = shape.batch, shape.q_len, shape.kv_len, shape.heads, shape.head_dim
    (qp, q), (kp, k), (vp, v) = (
        _view(name, b, n, h, d, view) for name, n, view in zip("qkv", (nq, nk, nk), views, strict=True)
    )
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
    return te.create_prim_func([qp, kp, vp, o]).without_attr("global_symbol")


def supports_flash_attention(target: tvm.target.Target) -> bool:
    """True for targets :func:`flash_attention_kernel` runs on: CUDA with tensor cores (sm_80+)."""
    return sm_version(target) >= MIN_SM


KernelFactory = Callable[..., tirx.PrimFunc]  # (shape, scale, views=NO_VIEWS): flash_attention_kernel's


@dataclass(frozen=True)
class _Match:
    """One attention found in the graph: its ``[B, N, H, D]`` inputs, scale and shape."""

    q: relax.Expr
    k: relax.Expr
    v: relax.Expr
    scale: float
    shape: AttentionShape


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
            elif name == "relax.permute_dims":
                composed = _through_permute(axes, value)
                if composed is None:
                    return None
                axes = composed
            else:
                break
            expr = value.args[0]
            value = self.value(expr)
        if axes != perm or len(expr.ty.shape) != 4 or str(expr.ty.dtype) != "float16":
            return None
        return expr, scale


def _through_permute(axes: list[int], call: relax.Call) -> list[int] | None:
    """Axis map ``axes`` (axis i of a result is axis ``axes[i]`` of ``call``'s output) carried back to
    ``call``'s input; None when ``call`` has no explicit axes or another rank than ``axes``."""
    perm = call.attrs.axes
    if perm is None or len(perm) != len(axes):
        return None
    return [int(perm[i]) for i in axes]


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
    if q is None or k is None or v is None or v[1] != 1.0:  # a scaled V would scale the output instead
        return None
    qs, ks, vs = (static_shape(x[0].ty.shape) for x in (q, k, v))
    if qs is None or ks is None or vs is None or ks != vs or qs[0] != ks[0] or qs[2:] != ks[2:]:
        return None
    shape = AttentionShape(qs[0], qs[1], ks[1], qs[2], qs[3])
    total_scale = scale * q[1] * k[1]
    if not shape.supported() or total_scale <= 0:  # a softmax temperature is positive
        return None
    return _Match(q[0], k[0], v[0], total_scale, shape)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, kernel: KernelFactory, pack: bool) -> None:
        super().__init__(mod)
        self.kernel = kernel
        self.pack = pack
        self.walker: _Walker | None = None
        self.kernels: dict[tuple[AttentionShape, float, Views], tvm.ir.GlobalVar] = {}
        self.outputs: dict[relax.Call, relax.Var] = {}  # attention matmul -> its kernel call's output
        self.rewritten = 0

    def visit_function_(self, func: relax.Function) -> relax.Expr:
        self.walker = _Walker(func)
        return super().visit_function_(func)

    def _kernel(self, shape: AttentionShape, scale: float, views: Views) -> tvm.ir.GlobalVar:
        key = (shape, scale, views)
        if key not in self.kernels:
            func = self.kernel(shape, scale, views=views) if views != NO_VIEWS else self.kernel(shape, scale)
            self.kernels[key] = self.builder_.add_func(func, "flash_attention")
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
        if self.walker is None or op_name(call) != "relax.permute_dims" or str(call.ty.dtype) != "float16":
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
        found = match_attention(self.walker, call) if self.walker is not None else None
        if found is None:
            return super().visit_call_(call)
        s = found.shape
        args, views = self._inputs(found)
        kernel = self._kernel(s, found.scale, views)
        out = self.builder_.emit(
            relax.call_tir(kernel, args, relax.TensorType((s.batch, s.q_len, s.heads, s.head_dim), "float16"))
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
    Q, K and V as the ``[B, N, H, D]`` tensors the transposes started from, or, with ``pack`` (default),
    where they are in the merged projections they were split from (:class:`MergeProjections`), so the
    splits are not computed."""

    def __init__(self, kernel: KernelFactory | None = None, pack: bool = True) -> None:
        self.kernel = kernel or flash_attention_kernel
        self.pack = pack

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Rewriter(mod, self.kernel, self.pack)
        result = rewrite_and_clean(mod, rewriter)
        if rewriter.rewritten:
            log.info("%d attentions became flash-attention kernels", rewriter.rewritten)
        return result

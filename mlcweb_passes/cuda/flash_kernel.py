"""The flash-attention kernel: ``softmax(Q @ K^T * scale) @ V`` in one CUDA kernel on tensor cores.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tvm
from tvm import te, tirx
from tvm.script import tirx as T  # noqa: N812

from .._tir import HAND_WRITTEN, SOURCE_ATTR
from ..targets import sm_version

__all__ = [
    "MAX_HEAD_DIM",
    "NO_VIEWS",
    "AttentionShape",
    "Views",
    "choose_flash_tile",
    "flash_attention_kernel",
    "reference_attention_kernel",
    "supports_flash_attention",
]

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
    (numbers in benchmarks/README.md). Each warp takes
    ``m_tiles`` 16-row query tiles; every K/V operand it loads from shared memory then serves all of them.

    - Self-attention of 1024 tokens or more, heads up to 48 wide: 8 warps of two tiles (256 query rows)
      over 128-key steps (SD's 64x64 latents, 40-wide heads). Wider heads would need
      more registers for two tiles' outputs than a thread has.
    - The same up to 80 wide: 8 warps of one tile over 256-key steps (faster than 4 warps over 64 keys
      at 32x32 latents).
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
    dtype: str = "float16",
) -> tirx.PrimFunc:
    """The kernel ``o = softmax(q @ k^T * scale) @ v`` for ``shape`` (float16 in and out, float32 inside),
    marked ``tirx.is_scheduled`` so schedule rules leave it alone. CUDA sm_80+ (``mma.sync``).

    A thread block of ``warps`` warps takes ``16 * m_tiles * warps`` query rows and walks the keys
    ``block_n`` at a time (all three by default :func:`choose_flash_tile`'s).

    ``views``: for each of Q, K, V, None (a ``[B, N, H, D]`` tensor) or ``(count, index)``: the input is a
    ``[B, N, count, H, D]`` tensor of which the kernel reads part ``index`` (projections merged by
    :class:`~mlcweb_passes.MergeProjections`, read where they are instead of split out). ``dtype`` must be
    float16 (the tensor cores' operands)."""
    if dtype != "float16":
        raise ValueError(f"the CUDA flash-attention kernel takes float16 inputs, not {dtype}")
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


def _view(
    name: str, b: int, n: int, h: int, d: int, view: tuple[int, int] | None, dtype: str
) -> tuple[te.Tensor, te.Tensor]:
    """A ``[B, N, H, D]`` input: the placeholder and the tensor read (part ``index`` of a
    ``[B, N, count, H, D]`` placeholder for ``view = (count, index)``)."""
    if view is None:
        x = te.placeholder((b, n, h, d), dtype, name=name)
        return x, x
    whole = te.placeholder((b, n, view[0], h, d), dtype, name=name)
    return whole, te.compute((b, n, h, d), lambda i, m, j, c: whole[i, m, view[1], j, c], name=f"{name}_part")


def reference_attention_kernel(
    shape: AttentionShape, scale: float, views: Views = NO_VIEWS, dtype: str = "float16"
) -> tirx.PrimFunc:
    """The same computation as :func:`flash_attention_kernel` written plainly in TE (scores materialised),
    for targets without tensor cores and to check :class:`FlashAttention`'s rewrite anywhere; ``dtype``
    in and out (the probabilities in it too), float32 inside."""
    b, nq, nk, h, d = shape.batch, shape.q_len, shape.kv_len, shape.heads, shape.head_dim
    (qp, q), (kp, k), (vp, v) = (
        _view(name, b, n, h, d, view, dtype) for name, n, view in zip("qkv", (nq, nk, nk), views, strict=True)
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
    p = te.compute((b, h, nq, nk), lambda i, j, m, n: (e[i, j, m, n] / total[i, j, m]).astype(dtype), name="probs")
    rv = te.reduce_axis((0, nk), name="rv")
    acc = te.compute(
        (b, nq, h, d),
        lambda i, m, j, c: te.sum(p[i, j, m, rv].astype("float32") * v[i, rv, j, c].astype("float32"), axis=rv),
        name="weighted",
    )
    o = te.compute((b, nq, h, d), lambda *i: acc[i].astype(dtype), name="attention")
    return te.create_prim_func([qp, kp, vp, o]).without_attr("global_symbol")


def supports_flash_attention(target: tvm.target.Target) -> bool:
    """True for targets :func:`flash_attention_kernel` runs on: CUDA with tensor cores (sm_80+)."""
    return sm_version(target) >= MIN_SM

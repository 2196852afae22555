"""A WebGPU flash-attention kernel: ``softmax(Q @ K^T * scale) @ V`` in one dispatch, no score matrix.

Unfused, SD's self-attention at 64x64 latents writes each head's 4096x4096 score matrix, reads it back
for the softmax, writes the probabilities and reads them again for ``P @ V``; on WebGPU the graph also
has to be cut into row chunks (:class:`~mlcweb_passes.ChunkAttentionRows`) so no score buffer passes the
adapter's binding limit. :func:`webgpu_flash_attention_kernel` keeps the scores in registers and
workgroup memory, as FlashAttention-2 does (Dao, 2023), with plain multiply-adds (WebGPU has no tensor
cores to ask for portably):

- a workgroup of ``row_groups x COLUMN_GROUPS`` threads takes ``rows`` query rows of one head; thread
  ``(y, x)`` owns rows ``y, y + row_groups, ...`` (``rows_per_thread`` of them), key columns
  ``x, x + 8, ...`` of each key tile and output columns ``x, x + 8, ...`` of the head, so neighbouring
  threads read neighbouring workgroup-memory words and the rows of a subgroup fall in distinct banks;
- the Q tile is copied to workgroup memory once; the keys are walked ``keys`` at a time, K's tile copied
  into a buffer that V's tile then reuses, rows padded by one element; each thread copies the rows and
  columns it owns (no index division), eight neighbouring columns a row;
- each thread computes its ``rows_per_thread x keys / 8`` scores in registers (float32 accumulators),
  takes its rows' maxima, and the eight threads sharing a row combine theirs through workgroup memory;
  the online softmax keeps the running maximum in base 2 over raw scores (the scale is positive), so a
  probability is ``exp2(s * scale * log2(e) - m)`` and the running output is rescaled by
  ``exp2(m_old - m_new)``;
- the probabilities go to workgroup memory (in the input's dtype, as tensor-core kernels cast them for
  their second product), and each thread adds its rows' share of ``P @ V`` to float32 accumulators;
- at the end each row is divided by its sum and stored in the input's ``[B, N, H, D]`` layout.

Keys past the sequence get a score of -1e30 (finite: no ``inf - inf``) and zero values; query rows past
it are computed on zeros and not stored. The tile comes from :func:`choose_webgpu_flash_tile`: the
largest that fits the target's workgroup memory (``max_shared_memory_per_block``, 16 KiB when the
target does not say, WebGPU's default limit) and thread limit.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tvm import tirx
from tvm.script import tirx as T  # noqa: N812

from .._tir import HAND_WRITTEN, SOURCE_ATTR
from ..cuda.flash_kernel import NO_VIEWS, AttentionShape, Views

__all__ = [
    "ATTENTION_ATTR",
    "COLUMN_GROUPS",
    "MAX_HEAD_DIM",
    "WebGPUFlashTile",
    "choose_webgpu_flash_tile",
    "fits_webgpu_flash_attention",
    "webgpu_flash_attention_kernel",
]

COLUMN_GROUPS = 8  # threads sharing a query row: each takes every 8th key and output column
MAX_HEAD_DIM = 160  # output accumulators in registers: rows_per_thread * 160 / 8 floats a thread
NEG_INF = -1e30
DTYPES = ("float16", "float32")
WEBGPU_DEFAULT_SHARED = 16384  # maxComputeWorkgroupStorageSize every WebGPU adapter grants
# PrimFunc attribute of each kernel: what it computes, as JSON ({batch, q_len, kv_len, heads, head_dim,
# scale, views, dtype}), for kernels written for the same attention elsewhere (webgpu/matrix_attention)
ATTENTION_ATTR = "mlcweb.attention"


@dataclass(frozen=True)
class WebGPUFlashTile:
    """A workgroup's share of one head's attention: ``rows`` query rows (``rows_per_thread`` a thread),
    walking ``keys`` keys a step."""

    rows: int = 64
    keys: int = 32
    rows_per_thread: int = 4

    @property
    def row_groups(self) -> int:
        return self.rows // self.rows_per_thread

    @property
    def spec(self) -> str:
        """``ROWSxKEYSxROWS_PER_THREAD``, as :meth:`parse` reads it."""
        return f"{self.rows}x{self.keys}x{self.rows_per_thread}"

    @classmethod
    def parse(cls, spec: str) -> WebGPUFlashTile:
        """A tile from ``ROWSxKEYS`` (4 rows a thread) or ``ROWSxKEYSxROWS_PER_THREAD``; ValueError for
        anything else or a tile that is not :meth:`valid`."""
        try:
            sizes = [int(v) for v in spec.lower().split("x")]
        except ValueError:
            sizes = []
        if len(sizes) not in (2, 3):
            raise ValueError(f"a flash-attention tile is ROWSxKEYS or ROWSxKEYSxROWS_PER_THREAD, not {spec!r}")
        tile = cls(*sizes)
        if not tile.valid():
            raise ValueError(
                f"flash-attention tile {spec!r}: rows a multiple of rows per thread, keys of "
                f"{COLUMN_GROUPS} and of rows / rows per thread"
            )
        return tile

    @property
    def threads(self) -> int:
        return self.row_groups * COLUMN_GROUPS

    def valid(self) -> bool:
        return (
            self.rows % self.rows_per_thread == 0
            and self.keys % COLUMN_GROUPS == 0
            and self.keys % self.row_groups == 0
            and min(self.rows, self.keys, self.rows_per_thread) > 0
        )

    def shared_bytes(self, head_dim: int, dtype: str) -> int:
        """Workgroup memory: the Q tile, the K/V tile, the probabilities (all in ``dtype``, rows padded by
        one element) and, for the row maxima and sums, a float32 word each per row and column group."""
        size = 2 if dtype == "float16" else 4
        dp = _padded(head_dim)
        tiles = self.rows * (dp + 1) + self.keys * (dp + 1) + self.rows * (self.keys + 1)
        return tiles * size + 2 * self.rows * COLUMN_GROUPS * 4


# Largest first: more rows share each K/V tile copied; fewer keys a step keep the scores' registers few.
TILES = (
    WebGPUFlashTile(64, 32, 4),
    WebGPUFlashTile(32, 32, 4),
    WebGPUFlashTile(32, 16, 4),
    WebGPUFlashTile(16, 16, 4),
    WebGPUFlashTile(16, 8, 2),
    WebGPUFlashTile(8, 8, 1),
)


def _padded(head_dim: int) -> int:
    return -(-head_dim // COLUMN_GROUPS) * COLUMN_GROUPS


def choose_webgpu_flash_tile(
    shape: AttentionShape,
    dtype: str,
    max_shared: int = WEBGPU_DEFAULT_SHARED,
    max_threads: int = 256,
    first: Sequence[WebGPUFlashTile] = (),
) -> WebGPUFlashTile:
    """The first of ``first`` (tiles a build prefers, e.g. measured ones) then :data:`TILES` that fits
    ``max_shared`` bytes of workgroup memory and ``max_threads`` threads for ``shape``'s head dimension in
    ``dtype``, with no more rows than the queries need."""
    for tile in (*first, *TILES):
        fits = tile.shared_bytes(shape.head_dim, dtype) <= max_shared and tile.threads <= max_threads
        if fits and (tile.rows <= max(16, shape.q_len) or tile is TILES[-1]):
            return tile
    raise ValueError(
        f"no flash-attention tile for head dimension {shape.head_dim} in {dtype} fits {max_shared} bytes "
        f"of workgroup memory and {max_threads} threads"
    )


def supported(shape: AttentionShape, dtype: str) -> bool:
    """True when :func:`webgpu_flash_attention_kernel` handles ``shape`` in ``dtype`` on some adapter."""
    return dtype in DTYPES and 0 < shape.head_dim <= MAX_HEAD_DIM and shape.supported()


def fits_webgpu_flash_attention(
    shape: AttentionShape,
    dtype: str,
    max_shared: int = WEBGPU_DEFAULT_SHARED,
    max_threads: int = 256,
    first: Sequence[WebGPUFlashTile] = (),
) -> bool:
    """True when :func:`webgpu_flash_attention_kernel` handles ``shape`` in ``dtype`` within these limits."""
    if not supported(shape, dtype):
        return False
    try:
        choose_webgpu_flash_tile(shape, dtype, max_shared, max_threads, first)
    except ValueError:
        return False
    return True


def webgpu_flash_attention_kernel(
    shape: AttentionShape,
    scale: float,
    views: Views = NO_VIEWS,
    dtype: str = "float16",
    max_shared: int = WEBGPU_DEFAULT_SHARED,
    max_threads: int = 256,
    tile: WebGPUFlashTile | None = None,
    first: Sequence[WebGPUFlashTile] = (),
) -> tirx.PrimFunc:
    """The WebGPU kernel ``o = softmax(q @ k^T * scale) @ v`` for ``shape`` (``dtype`` in and out,
    float32 inside), marked ``tirx.is_scheduled`` so schedule rules leave it alone. ``views`` as for
    :func:`~mlcweb_passes.cuda.flash_kernel.flash_attention_kernel`; ``tile`` by default
    :func:`choose_webgpu_flash_tile`'s for ``max_shared`` and ``max_threads`` (the target's limits),
    trying ``first`` before :data:`TILES`."""
    if not supported(shape, dtype):
        raise ValueError(
            f"WebGPU flash attention does not support {shape} in {dtype} "
            f"(head_dim 1..{MAX_HEAD_DIM}, dtype one of {', '.join(DTYPES)})"
        )
    if len(views) != 3 or any(view is not None and not 0 <= view[1] < view[0] for view in views):
        raise ValueError(f"views must be three None or (count, index) with index < count, not {views}")
    tile = tile or choose_webgpu_flash_tile(shape, dtype, max_shared, max_threads, first)
    if not tile.valid():
        raise ValueError(
            f"invalid flash-attention tile {tile}: rows a multiple of rows_per_thread, keys of 8 and of the row groups"
        )
    b, nq, nk, h, d = shape.batch, shape.q_len, shape.kv_len, shape.heads, shape.head_dim
    q_shape, k_shape, v_shape = (
        (b, n, view[0], h, d) if view is not None else (b, n, h, d) for view, n in zip(views, (nq, nk, nk), strict=True)
    )
    g = COLUMN_GROUPS
    br, bc, rm, ry = tile.rows, tile.keys, tile.rows_per_thread, tile.row_groups
    dp = _padded(d)
    qrow, prow = dp + 1, bc + 1  # workgroup-memory row strides: a subgroup's rows in distinct banks
    jc, jd = bc // g, dp // g  # a thread's key columns of a tile, output columns of the head
    kv_rows = bc // ry  # K/V tile rows a thread copies (rows y, y + row_groups, ...; its own columns)
    n_qt, n_kt = -(-nq // br), -(-nk // bc)
    scale2 = float(scale) * 1.4426950408889634  # scores kept in base 2: exp2(s * scale2 - m)
    neg = NEG_INF

    def at(buf: Any, which: int, bb: Any, r: Any, hh: Any, c: Any) -> Any:  # row r, head hh, column c of Q/K/V
        view = views[which]
        return buf[bb, r, view[1], hh, c] if view is not None else buf[bb, r, hh, c]

    def row(i: Any, ty: Any) -> Any:  # the tile row of a thread's i-th row
        return ty + ry * i

    # fmt: off
    @T.macro
    def copy_rows(dst: Any, src: Any, which: int, first: Any, limit: int, rows: int, bb: Any, hh: Any, ty: Any,
                  tx: Any) -> None:
        """Rows ``first + row(i, ty)`` (i < rows) of Q, K or V into ``dst``, the thread's own columns,
        zero past ``limit`` rows and the head dimension."""
        for i in T.unroll(rows):
            for j in T.unroll(jd):
                if first + row(i, ty) < limit and tx + g * j < d:
                    dst[row(i, ty) * qrow + tx + g * j] = at(src, which, bb, first + row(i, ty), hh, tx + g * j)
                else:
                    dst[row(i, ty) * qrow + tx + g * j] = T.Cast(dtype, 0)

    @T.prim_func(private=True)
    def flash(q: T.Buffer(q_shape, dtype), k: T.Buffer(k_shape, dtype),  # type: ignore[valid-type,no-untyped-def]
              v: T.Buffer(v_shape, dtype), o: T.Buffer((b, nq, h, d), dtype)):  # type: ignore[valid-type]
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        bx = T.launch_thread("blockIdx.x", n_qt)
        by = T.launch_thread("blockIdx.y", b * h)
        tx = T.launch_thread("threadIdx.x", g)
        ty = T.launch_thread("threadIdx.y", ry)
        qs = T.decl_buffer((br * qrow,), dtype, scope="shared")
        kv = T.decl_buffer((bc * qrow,), dtype, scope="shared")  # K's tile, then V's
        ps = T.decl_buffer((br * prow,), dtype, scope="shared")
        red_m = T.decl_buffer((br * g,), "float32", scope="shared")  # each thread's row maxima
        red_l = T.decl_buffer((br * g,), "float32", scope="shared")  # ... and row sums
        sc = T.decl_buffer((rm * jc,), "float32", scope="local")
        acc = T.decl_buffer((rm * jd,), "float32", scope="local")
        m_r = T.decl_buffer((rm,), "float32", scope="local")  # running max (base 2) of the thread's rows
        l_r = T.decl_buffer((rm,), "float32", scope="local")  # running sums of those rows
        alpha = T.decl_buffer((rm,), "float32", scope="local")
        mx = T.decl_buffer((1,), "float32", scope="local")
        bb = by // h
        hh = by % h
        # the Q tile, zero-padded: each thread copies its own rows and columns
        copy_rows(qs, q, 0, bx * br, nq, rm, bb, hh, ty, tx)
        for i0 in T.unroll(rm * jd):
            acc[i0] = T.float32(0)
        for r0 in T.unroll(rm):
            m_r[r0] = T.float32(neg)
            l_r[r0] = T.float32(0)
        for kt in range(n_kt):
            T.tvm_storage_sync("shared")  # the last step's reads of kv and ps are done
            copy_rows(kv, k, 1, kt * bc, nk, kv_rows, bb, hh, ty, tx)
            T.tvm_storage_sync("shared")
            # S = Q @ K^T for the thread's rows and key columns
            for i2 in T.unroll(rm * jc):
                sc[i2] = T.float32(0)
            for c in range(dp):
                for ri in T.unroll(rm):
                    for j in T.unroll(jc):
                        sc[ri * jc + j] = sc[ri * jc + j] + T.Cast("float32", qs[row(ri, ty) * qrow + c]) * T.Cast(
                            "float32", kv[(tx + g * j) * qrow + c])
            # each row's maximum over the tile: the thread's share, then the 8 shares of the row
            for r1 in T.unroll(rm):
                mx[0] = T.float32(neg)
                for j1 in T.unroll(jc):
                    sc[r1 * jc + j1] = T.if_then_else(kt * bc + tx + g * j1 < nk, sc[r1 * jc + j1], T.float32(neg))
                    mx[0] = T.max(mx[0], sc[r1 * jc + j1])
                red_m[row(r1, ty) * g + tx] = mx[0]
            T.tvm_storage_sync("shared")  # every thread is past its reads of K
            for r2 in T.unroll(rm):
                mx[0] = T.float32(neg)
                for x in T.unroll(g):
                    mx[0] = T.max(mx[0], red_m[row(r2, ty) * g + x])
                mx[0] = T.max(m_r[r2], mx[0] * T.float32(scale2))
                alpha[r2] = T.exp2(m_r[r2] - mx[0])
                m_r[r2] = mx[0]
                mx[0] = T.float32(0)
                for j2 in T.unroll(jc):
                    sc[r2 * jc + j2] = T.exp2(sc[r2 * jc + j2] * T.float32(scale2) - m_r[r2])
                    mx[0] = mx[0] + sc[r2 * jc + j2]
                    ps[row(r2, ty) * prow + tx + g * j2] = T.Cast(dtype, sc[r2 * jc + j2])
                red_l[row(r2, ty) * g + tx] = mx[0]
            copy_rows(kv, v, 2, kt * bc, nk, kv_rows, bb, hh, ty, tx)
            T.tvm_storage_sync("shared")
            for r3 in T.unroll(rm):
                mx[0] = T.float32(0)
                for x1 in T.unroll(g):
                    mx[0] = mx[0] + red_l[row(r3, ty) * g + x1]
                l_r[r3] = l_r[r3] * alpha[r3] + mx[0]
                for j3 in T.unroll(jd):
                    acc[r3 * jd + j3] = acc[r3 * jd + j3] * alpha[r3]
            # O += P @ V for the thread's rows and output columns
            for c1 in range(bc):
                for r4 in T.unroll(rm):
                    for j4 in T.unroll(jd):
                        acc[r4 * jd + j4] = acc[r4 * jd + j4] + T.Cast("float32", ps[row(r4, ty) * prow + c1]) * T.Cast(
                            "float32", kv[c1 * qrow + tx + g * j4])
        for r5 in T.unroll(rm):
            for j5 in T.unroll(jd):
                if bx * br + row(r5, ty) < nq and tx + g * j5 < d:
                    o[bb, bx * br + row(r5, ty), hh, tx + g * j5] = T.Cast(dtype, acc[r5 * jd + j5] / l_r[r5])
    # fmt: on
    about = {**dataclasses.asdict(shape), "scale": float(scale), "views": [list(v) if v else None for v in views]}
    return flash.with_attr(SOURCE_ATTR, HAND_WRITTEN).with_attr(ATTENTION_ATTR, json.dumps({**about, "dtype": dtype}))

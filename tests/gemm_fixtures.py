"""Fused float16 GEMM PrimFuncs as legalization and fusion leave them (shapes shrunk from SD1.5's): what
the tensor-core kernel generators (CUDA wgmma, WebGPU subgroup matrices) are tested on."""

from __future__ import annotations

from tvm.script import ir as I
from tvm.script import tirx as T


@I.ir_module
class Gemms:
    """Four fused GEMMs as legalization and fusion leave them (shapes shrunk from SD1.5's), and one with a
    strided reduction axis that the kernel cannot read."""

    @T.prim_func(s_tir=True)
    def conv3x3_bias_residual(
        x: T.Buffer((2, 8, 8, 64), "float16"),
        w: T.Buffer((128, 3, 3, 64), "float16"),
        bias: T.Buffer((1, 1, 1, 128), "float32"),
        res: T.Buffer((2, 8, 8, 128), "float16"),
        out: T.Buffer((2, 8, 8, 128), "float16"),
    ):
        T.func_attr({"tirx.noalias": True})
        pad = T.sblock_alloc_buffer((2, 10, 10, 64), "float16")
        conv = T.sblock_alloc_buffer((2, 8, 8, 128))
        biased = T.sblock_alloc_buffer((2, 8, 8, 128))
        for i0, i1, i2, i3 in T.grid(2, 10, 10, 64):
            with T.sblock("pad"):
                v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
                pad[v0, v1, v2, v3] = T.if_then_else(
                    v1 >= 1 and v1 < 9 and v2 >= 1 and v2 < 9, x[v0, v1 - 1, v2 - 1, v3], T.float16(0)
                )
        for n, y, xx, f, ry, rx, rc in T.grid(2, 8, 8, 128, 3, 3, 64):
            with T.sblock("conv"):
                vn, vy, vx, vf, vry, vrx, vrc = T.axis.remap("SSSSRRR", [n, y, xx, f, ry, rx, rc])
                with T.init():
                    conv[vn, vy, vx, vf] = T.float32(0)
                conv[vn, vy, vx, vf] = conv[vn, vy, vx, vf] + T.Cast(
                    "float32", pad[vn, vy + vry, vx + vrx, vrc]
                ) * T.Cast("float32", w[vf, vry, vrx, vrc])
        for i0, i1, i2, i3 in T.grid(2, 8, 8, 128):
            with T.sblock("bias"):
                v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
                biased[v0, v1, v2, v3] = conv[v0, v1, v2, v3] + bias[0, 0, 0, v3]
        for i0, i1, i2, i3 in T.grid(2, 8, 8, 128):
            with T.sblock("residual"):
                v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
                out[v0, v1, v2, v3] = T.Cast("float16", biased[v0, v1, v2, v3] * T.float32(0.5)) + res[v0, v1, v2, v3]

    @T.prim_func(s_tir=True)
    def linear_transposed(
        x: T.Buffer((2, 40, 64), "float16"), w: T.Buffer((96, 64), "float16"), out: T.Buffer((2, 96, 40), "float16")
    ):
        T.func_attr({"tirx.noalias": True})
        acc = T.sblock_alloc_buffer((2, 40, 96))
        for b, t, o, k in T.grid(2, 40, 96, 64):
            with T.sblock("matmul"):
                vb, vt, vo, vk = T.axis.remap("SSSR", [b, t, o, k])
                with T.init():
                    acc[vb, vt, vo] = T.float32(0)
                acc[vb, vt, vo] = acc[vb, vt, vo] + T.Cast("float32", x[vb, vt, vk]) * T.Cast("float32", w[vo, vk])
        for b, o, t in T.grid(2, 96, 40):
            with T.sblock("transpose"):
                vb, vo, vt = T.axis.remap("SSS", [b, o, t])
                out[vb, vo, vt] = T.Cast("float16", acc[vb, vt, vo])

    @T.prim_func(s_tir=True)
    def conv_split_k(
        x: T.Buffer((2, 8, 8, 2, 64), "float16"),
        w: T.Buffer((64, 3, 3, 2, 64), "float16"),
        out: T.Buffer((2, 2, 8, 8, 64), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        pad = T.sblock_alloc_buffer((2, 10, 10, 2, 64), "float16")
        for i0, i1, i2, i3, i4 in T.grid(2, 10, 10, 2, 64):
            with T.sblock("pad"):
                v0, v1, v2, v3, v4 = T.axis.remap("SSSSS", [i0, i1, i2, i3, i4])
                pad[v0, v1, v2, v3, v4] = T.if_then_else(
                    v1 >= 1 and v1 < 9 and v2 >= 1 and v2 < 9, x[v0, v1 - 1, v2 - 1, v3, v4], T.float16(0)
                )
        for s, n, i, j, o, rh, rw, rc in T.grid(2, 2, 8, 8, 64, 3, 3, 64):
            with T.sblock("conv"):
                vs, vn, vi, vj, vo, vrh, vrw, vrc = T.axis.remap("SSSSSRRR", [s, n, i, j, o, rh, rw, rc])
                with T.init():
                    out[vs, vn, vi, vj, vo] = T.float32(0)
                out[vs, vn, vi, vj, vo] = out[vs, vn, vi, vj, vo] + T.Cast(
                    "float32", pad[vn, vi + vrh, vj + vrw, vs, vrc]
                ) * T.Cast("float32", w[vo, vrh, vrw, vs, vrc])

    @T.prim_func(s_tir=True)
    def conv_out(
        x: T.Buffer((2, 8, 8, 64), "float16"),
        w: T.Buffer((3, 3, 3, 64), "float16"),
        bias: T.Buffer((1, 1, 1, 3), "float32"),
        out: T.Buffer((2, 8, 8, 3), "float16"),
    ):
        """The VAE's last convolution: three output channels, fewer than one 8-column wgmma."""
        T.func_attr({"tirx.noalias": True})
        pad = T.sblock_alloc_buffer((2, 10, 10, 64), "float16")
        conv = T.sblock_alloc_buffer((2, 8, 8, 3))
        for i0, i1, i2, i3 in T.grid(2, 10, 10, 64):
            with T.sblock("pad"):
                v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
                pad[v0, v1, v2, v3] = T.if_then_else(
                    v1 >= 1 and v1 < 9 and v2 >= 1 and v2 < 9, x[v0, v1 - 1, v2 - 1, v3], T.float16(0)
                )
        for n, y, xx, f, ry, rx, rc in T.grid(2, 8, 8, 3, 3, 3, 64):
            with T.sblock("conv"):
                vn, vy, vx, vf, vry, vrx, vrc = T.axis.remap("SSSSRRR", [n, y, xx, f, ry, rx, rc])
                with T.init():
                    conv[vn, vy, vx, vf] = T.float32(0)
                conv[vn, vy, vx, vf] = conv[vn, vy, vx, vf] + T.Cast(
                    "float32", pad[vn, vy + vry, vx + vrx, vrc]
                ) * T.Cast("float32", w[vf, vry, vrx, vrc])
        for i0, i1, i2, i3 in T.grid(2, 8, 8, 3):
            with T.sblock("bias"):
                v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
                out[v0, v1, v2, v3] = T.Cast("float16", conv[v0, v1, v2, v3] + bias[0, 0, 0, v3])

    @T.prim_func(s_tir=True)
    def geglu(
        x: T.Buffer((2, 64, 64), "float16"),
        w: T.Buffer((256, 64), "float16"),
        bias: T.Buffer((256,), "float32"),
        out: T.Buffer((2, 64, 128), "float16"),
    ):
        """GEGLU over interleaved columns, as GegluPairs and fusion leave it: value j is column 2j, gate j
        column 2j + 1."""
        T.func_attr({"tirx.noalias": True})
        acc = T.sblock_alloc_buffer((2, 64, 256))
        pairs = T.sblock_alloc_buffer((2, 64, 128))
        for b, t, n, k in T.grid(2, 64, 256, 64):
            with T.sblock("matmul"):
                vb, vt, vn, vk = T.axis.remap("SSSR", [b, t, n, k])
                with T.init():
                    acc[vb, vt, vn] = T.float32(0)
                acc[vb, vt, vn] = acc[vb, vt, vn] + T.Cast("float32", x[vb, vt, vk]) * T.Cast("float32", w[vn, vk])
        for b, t, j in T.grid(2, 64, 128):
            with T.sblock("geglu"):
                vb, vt, vj = T.axis.remap("SSS", [b, t, j])
                pairs[vb, vt, vj] = (acc[vb, vt, vj * 2] + bias[vj * 2]) * (
                    (acc[vb, vt, vj * 2 + 1] + bias[vj * 2 + 1])
                    * (
                        T.float32(0.5)
                        + T.erf((acc[vb, vt, vj * 2 + 1] + bias[vj * 2 + 1]) * T.float32(0.7071067811865476))
                        * T.float32(0.5)
                    )
                )
        for b, t, j in T.grid(2, 64, 128):
            with T.sblock("cast"):
                vb, vt, vj = T.axis.remap("SSS", [b, t, j])
                out[vb, vt, vj] = T.Cast("float16", pairs[vb, vt, vj])

    @T.prim_func(s_tir=True)
    def even_columns(
        x: T.Buffer((128, 64), "float16"), w: T.Buffer((64, 64), "float16"), out: T.Buffer((128, 32), "float16")
    ):
        """Every other column: still a pair epilogue (one output per pair), though it reads one of the two."""
        T.func_attr({"tirx.noalias": True})
        acc = T.sblock_alloc_buffer((128, 64))
        for i, n, k in T.grid(128, 64, 64):
            with T.sblock("matmul"):
                vi, vn, vk = T.axis.remap("SSR", [i, n, k])
                with T.init():
                    acc[vi, vn] = T.float32(0)
                acc[vi, vn] = acc[vi, vn] + T.Cast("float32", x[vi, vk]) * T.Cast("float32", w[vn, vk])
        for i, j in T.grid(128, 32):
            with T.sblock("even"):
                vi, vj = T.axis.remap("SS", [i, j])
                out[vi, vj] = T.Cast("float16", acc[vi, vj * 2])

    @T.prim_func(s_tir=True)
    def strided_weight(
        x: T.Buffer((128, 64), "float16"), w: T.Buffer((64, 96), "float16"), out: T.Buffer((128, 96), "float32")
    ):
        T.func_attr({"tirx.noalias": True})
        for i, j, k in T.grid(128, 96, 64):
            with T.sblock("matmul"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    out[vi, vj] = T.float32(0)
                out[vi, vj] = out[vi, vj] + T.Cast("float32", x[vi, vk]) * T.Cast("float32", w[vk, vj])

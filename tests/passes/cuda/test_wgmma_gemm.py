"""WgmmaGemm: fused float16 GEMM PrimFuncs become launches of generated Hopper wgmma kernels.

The wgmma kernels run only on an H100 (``benchmarks/gemm_tiles.py --wgmma-only`` checks each against
TVM's schedules there, ``benchmarks/sd_gpu.py`` the whole model against PyTorch). Here, on the CPU:

- the rewrite: which PrimFuncs become launchers, with what grid, and the attached module;
- the generated addressing and epilogue (``WgmmaKernel.io_source``), compiled for the host and run as a
  plain GEMM against TVM's own CPU build of the same PrimFunc;
- the CUDA source compiling for sm_90a.
"""

import shutil
import subprocess

import numpy as np
import pytest
import tvm
from testutil import H100
from tvm.script import ir as I
from tvm.script import tirx as T

import mlcweb_passes as mp
from mlcweb_passes.cuda import wgmma_compile, wgmma_gemm, wgmma_plan
from mlcweb_passes.cuda.wgmma_plan import choose_wgmma_tile
from mlcweb_passes.cuda.wgmma_source import THREADS, WgmmaKernel, WgmmaTile, module_source

SM90 = tvm.target.Target({"kind": "cuda", "arch": "sm_90", "max_num_threads": 1024, "thread_warp_size": 32})
NVCC = shutil.which("nvcc")


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


TAKEN = {
    "conv3x3_bias_residual": (2, 1, 1),
    "linear_transposed": (2, 1, 1),
    "conv_split_k": (1, 1, 2),
    "conv_out": (1, 1, 1),
    "geglu": (4, 1, 1),
    "even_columns": (1, 1, 1),
}  # 64-column tiles; 8 for conv_out


def test_plans_gemms_and_refuses_a_strided_reduction():
    shapes = {name: wgmma_plan.plan_kernel(Gemms[name], name, H100.sm_count) for name in TAKEN}
    assert [(k.batch, k.m, k.n, k.k) for k in shapes.values()] == [
        (1, 128, 128, 576),
        (1, 80, 96, 64),
        (2, 128, 64, 576),
        (1, 128, 3, 576),
        (1, 128, 256, 64),
        (1, 128, 64, 64),
    ]
    assert {name: k.grid() for name, k in shapes.items()} == TAKEN
    assert shapes["conv3x3_bias_residual"].pairs and not shapes["linear_transposed"].pairs  # transposed store
    assert shapes["geglu"].column_pairs and not shapes["geglu"].pairs  # one output of two columns
    assert "acc1" in shapes["geglu"].value and "acc1" not in shapes["even_columns"].value
    assert shapes["even_columns"].column_pairs  # one store per pair, not one per column into the same output
    assert not any(shapes[n].column_pairs for n in TAKEN if n not in ("geglu", "even_columns"))
    with pytest.raises(wgmma_plan.UnsupportedGemmError, match="reduction axis is not innermost"):
        wgmma_plan.plan_kernel(Gemms["strided_weight"], "strided", H100.sm_count)


def test_pass_replaces_gemms_with_launchers(monkeypatch):
    compiled = []
    monkeypatch.setattr(wgmma_gemm, "cuda_runtime", lambda: True)
    monkeypatch.setattr(wgmma_gemm, "compile_kernels", lambda kernels: compiled.append(kernels) or _some_module())
    with SM90:
        after = mp.WgmmaGemm()(Gemms)
    assert [k.name for k in compiled[0]] == [f"mlcweb_wgmma_{name}" for name in sorted(TAKEN)]
    assert len(after.attrs["external_mods"]) == 1
    for name, grid in TAKEN.items():
        func = after[name]
        assert func.attrs["tirx.is_scheduled"] and func.attrs["mlcweb.schedule"] == "hand-written"
        assert list(func.params) == list(Gemms[name].params)  # callers are unchanged
        call = func.body.value
        assert str(call.args[0].value) == f"mlcweb_wgmma_{name}"
        launch = [int(a) for a in call.args[-5:]]
        assert (
            launch[:4] == [*grid, THREADS]
            and launch[4] == wgmma_plan.plan_kernel(Gemms[name], name, H100.sm_count).tile.shared_bytes()
        )
    assert after["strided_weight"].same_as(Gemms["strided_weight"])


def test_pass_leaves_other_targets_alone():
    for target in ("llvm", {"kind": "cuda", "arch": "sm_80"}, {"kind": "cuda", "arch": "sm_100"}):
        with tvm.target.Target(target):
            assert mp.WgmmaGemm()(Gemms).same_as(Gemms)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc to build the kernels' host emulation")
@pytest.mark.parametrize("name", sorted(TAKEN))
def test_generated_addressing_and_epilogue_match_tvm(name, tmp_path):
    """The generated ``a_src`` / ``b_src`` / ``value`` / ``offset``, driven by a scalar GEMM on the CPU
    in 8-element K chunks as the kernel loads them, against TVM's llvm build of the PrimFunc."""
    func = Gemms[name]
    kernel = wgmma_plan.plan_kernel(func, f"k_{name}", H100.sm_count)
    rng = np.random.default_rng(0)
    arrays = [rng.uniform(-1, 1, [int(x) for x in p.shape]).astype(str(p.dtype)) for p in func.params]
    expected = [tvm.runtime.tensor(a) for a in arrays]
    tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), "llvm")["main"](*expected)
    for i, a in enumerate(arrays):
        a.tofile(tmp_path / f"p{i}.bin")
    program = tmp_path / "emulate.cu"
    program.write_text(_emulator(kernel, len(arrays)))
    subprocess.run([NVCC, "-std=c++17", "-O1", "-o", str(tmp_path / "emulate"), str(program)], check=True)
    subprocess.run([str(tmp_path / "emulate"), str(tmp_path)], check=True)
    got = np.fromfile(tmp_path / f"p{len(arrays) - 1}.bin", dtype=arrays[-1].dtype).reshape(arrays[-1].shape)
    want = expected[-1].numpy()
    tolerance = 2e-2 if want.dtype == np.float16 else 1e-3  # one float16 rounding of values up to ~10
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=tolerance, rtol=tolerance)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_kernels_compile_for_sm90a():
    kernels = [wgmma_plan.plan_kernel(Gemms[name], f"k_{name}", H100.sm_count, tile=WgmmaTile(64, 4)) for name in TAKEN]
    kernels += [
        wgmma_plan.plan_kernel(Gemms["conv3x3_bias_residual"], f"k_{n}", H100.sm_count, tile=WgmmaTile(n, 4))
        for n in (160, 256)
    ]
    cubin = wgmma_compile._cubin(module_source(kernels), "sm_90a")
    assert cubin[:4] == b"\x7fELF" and all(k.name.encode() in cubin for k in kernels)


def _emulator(kernel: WgmmaKernel, count: int) -> str:
    sums = "sum(s, m, n), sum(s, m, n + 1)" if kernel.column_pairs else "sum(s, m, n)"  # a pair epilogue's two
    fields = ", ".join(f"reinterpret_cast<decltype({kernel.name}_io::p{i})>(bufs[{i}].data())" for i in range(count))
    return f"""#include <cuda_fp16.h>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>
{kernel.io_source()}
int main(int, char** argv) {{
  std::vector<std::vector<char>> bufs;
  for (int i = 0; i < {count}; ++i) {{
    std::ifstream f(std::string(argv[1]) + "/p" + std::to_string(i) + ".bin", std::ios::binary);
    bufs.emplace_back(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }}
  const {kernel.name}_io io{{{fields}}};
  auto sum = [&](int s, int m, int n) {{
    float acc = 0.f;
    for (int k = 0; k < {kernel.k}; k += 8) {{
      bool a_ok = true, b_ok = true;
      const half* a = io.a_src(s, m, k, a_ok);
      const half* b = io.b_src(s, n, k, b_ok);
      if (a_ok && b_ok)
        for (int j = 0; j < 8; ++j) acc += __half2float(a[j]) * __half2float(b[j]);
    }}
    return acc;
  }};
  for (int s = 0; s < {kernel.batch}; ++s)
    for (int m = 0; m < {kernel.m}; ++m)
      for (int n = 0; n < {kernel.n}; n += {2 if kernel.column_pairs else 1})
        io.{kernel.out}[io.offset(s, m, n)] = io.value({sums}, s, m, n);
  std::ofstream out(std::string(argv[1]) + "/p{count - 1}.bin", std::ios::binary);
  out.write(bufs.back().data(), bufs.back().size());
}}
"""


def _some_module():
    """A runtime module standing in for the CUDA one (this TVM may have no CUDA runtime)."""
    func = tvm.tirx.PrimFunc([], tvm.tirx.Evaluate(0)).with_attr("global_symbol", "stand_in")
    return tvm.compile(tvm.IRModule({"stand_in": func}), "llvm").mod


@pytest.mark.parametrize(
    ("shape", "tile"),
    [
        ((1, 8192, 320, 2880), (160, 4)),  # 3x3 convolution at 64x64: long K, 128 blocks
        ((1, 8192, 320, 320), (160, 4)),  # attention projection: N=320 would pad to 384 in 128s
        ((1, 8192, 2560, 320), (128, 3)),  # GEGLU projection: short K, two blocks per SM
        ((6, 512, 1280, 2880), (256, 4)),  # split-K: 120 blocks of 256 columns fill one wave
        ((8, 512, 1280, 2880), (160, 4)),  # ... but 160 of 8 slices would leave 28 for a second
        ((3, 2048, 640, 2880), (128, 3)),  # 160 columns would leave a 60-block second wave
        ((1, 65536, 512, 4608), (256, 4)),  # VAE convolution at 256x256
        ((1, 512, 1280, 1280), (64, 4)),  # 40 blocks of 128 columns: narrower tiles for more blocks
        ((1, 262144, 3, 1152), (8, 4)),  # VAE's output convolution: 3 channels in one 8-column wgmma
        ((1, 8192, 4, 2880), (8, 4)),  # UNet's
    ],
)
def test_tile_rule(shape, tile):
    chosen = choose_wgmma_tile(*shape, H100.sm_count)
    assert (chosen.block_n, chosen.stages) == tile

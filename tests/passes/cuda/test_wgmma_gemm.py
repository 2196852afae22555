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
from gemm_fixtures import Gemms
from testutil import H100

import mlcweb_passes as mp
from mlcweb_passes.cuda import wgmma_compile, wgmma_gemm, wgmma_plan
from mlcweb_passes.cuda.wgmma_plan import choose_wgmma_tile
from mlcweb_passes.cuda.wgmma_source import THREADS, WgmmaKernel, WgmmaTile, module_source

SM90 = tvm.target.Target({"kind": "cuda", "arch": "sm_90", "max_num_threads": 1024, "thread_warp_size": 32})
NVCC = shutil.which("nvcc")


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

"""WebGPUMatmul: GEMMs and NCHW convolutions in large WebGPU tiles whose WGSL Dawn accepts.

The numbers are checked end to end by tests/web/test_browser.py: the tiny SD model's page (its GEMMs and
convolutions on this rule, on SwiftShader) gives the image the native build gives.
"""

from __future__ import annotations

import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp
from mlcweb.wgsl_check import check_wgsl, wgsl_sources
from mlcweb_passes.webgpu.gemm import LARGE, MEDIUM, SMALL, WebGPUMatmul, choose_webgpu_tile

WEBGPU = tvm.target.Target({"kind": "webgpu"}, host={"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"})


@I.ir_module
class Layers:
    @R.function
    def main(
        x: R.Tensor((256, 128), "float32"),
        w: R.Tensor((128, 192), "float32"),
        img: R.Tensor((1, 32, 16, 16), "float32"),
        k: R.Tensor((64, 32, 3, 3), "float32"),
    ) -> R.Tuple(R.Tensor((256, 192), "float32"), R.Tensor((1, 64, 16, 16), "float32")):
        with R.dataflow():
            y = R.matmul(x, w)  # a [K, N] weight: the copy walks N
            z = R.nn.conv2d(img, k, padding=[1, 1, 1, 1])  # NCHW: the input's copy walks the pixels
            out = (y, z)
            R.output(out)
        return out


def _fused(mod: tvm.IRModule) -> tvm.IRModule:
    with WEBGPU:
        return mp.FuseOperators()(mod)


@pytest.mark.parametrize("name", ["matmul", "conv2d"])
def test_the_rule_tiles_gemms_and_convolutions(name: str) -> None:
    fused = _fused(Layers)
    func = next(f for gv, f in fused.functions_items() if gv.name_hint.startswith(name))
    sch = WebGPUMatmul().apply(func, WEBGPU, False)
    assert sch is not None
    script = sch.mod.script()
    assert 'thread="threadIdx.x"' in script and 'scope="shared"' in script and "vthread" in script
    assert WebGPUMatmul().apply(func, tvm.target.Target("llvm"), False) is None  # WebGPU only


def test_tile_choice_follows_the_work() -> None:
    shared = int(WEBGPU.attrs["max_shared_memory_per_block"])  # 32 KiB, what the page asks the adapter for
    assert choose_webgpu_tile(2, 4096, 1280, 256, shared) == LARGE  # enough 128x128 workgroups
    assert choose_webgpu_tile(2, 4096, 1280, 256, 16384) == MEDIUM  # WebGPU's default 16 KiB
    assert choose_webgpu_tile(1, 512, 320, 256, shared) == MEDIUM
    assert choose_webgpu_tile(1, 32, 64, 256, shared) == SMALL
    assert choose_webgpu_tile(2, 4096, 1280, 128, shared) == SMALL  # an adapter of 128 threads


def test_the_pipeline_uses_it_and_dawn_accepts_every_shader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLCWEB_WGSL_CHECK", "require")
    exe = tvm.compile(Layers, WEBGPU, relax_pipeline=mp.pipeline(WEBGPU))
    sources = wgsl_sources(exe.mod)
    gemms = [code for name, code in sources.items() if "matmul" in name or "conv2d" in name]
    assert len(gemms) == 2 and all("@workgroup_size(16, 16, 1)" in code for code in gemms)
    assert check_wgsl(exe.mod) == len(sources)

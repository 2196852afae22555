"""Build-time WGSL check: every shader of a webgpu module compiles with Dawn, or the build names the kernel."""

from __future__ import annotations

import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp
from mlcweb.wgsl_check import WGSLCheckError, check_matrix_wgsl, check_wgsl, wgsl_sources

WEBGPU = tvm.target.Target({"kind": "webgpu"}, host={"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"})


@I.ir_module
class MatmulSoftmax:
    @R.function
    def main(x: R.Tensor((64, 64), "float32"), w: R.Tensor((64, 64), "float32")) -> R.Tensor((64, 64), "float32"):
        with R.dataflow():
            y = R.matmul(x, w)
            z = R.nn.softmax(y)
            R.output(z)
        return z


class _Module:
    """A compiled module's face as check_wgsl sees it: one webgpu module with the given WGSL."""

    kind = "webgpu"
    imports: list[object] = []

    def __init__(self, source: str) -> None:
        self.source = source

    def inspect_source(self) -> str:
        return self.source


def test_every_kernel_of_a_webgpu_build_is_compiled_by_dawn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLCWEB_WGSL_CHECK", "require")  # node, npm webgpu and SwiftShader are installed
    exe = tvm.compile(MatmulSoftmax, WEBGPU, relax_pipeline=mp.pipeline(WEBGPU))
    sources = wgsl_sources(exe.mod)
    assert sorted(sources) == ["matmul_kernel", "softmax_kernel"]
    assert all("@compute" in code for code in sources.values())
    assert check_wgsl(exe.mod) == 2


def test_a_shader_dawn_rejects_is_an_error_naming_its_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLCWEB_WGSL_CHECK", "require")
    bad = "// Function: mask_kernel\n//----\n@compute @workgroup_size(1) fn mask_kernel() { var m : i8 = 0; }\n"
    with pytest.raises(WGSLCheckError, match=r"kernel mask_kernel does not compile on WebGPU \(Dawn\): .*'i8'"):
        check_wgsl(_Module(bad))


def test_float16_in_a_float32_build_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A page runs the float32 build where the adapter lacks shader-f16, so no kernel of it may use f16
    (SwiftShader's check spells f16 as f32 and would pass it)."""
    monkeypatch.setenv("MLCWEB_WGSL_CHECK", "require")
    body = "@compute @workgroup_size(1) fn add_kernel() { var h : f16 = 1.0h; }"
    half = f"// Function: add_kernel\n//----\nenable f16;\n{body}\n"
    with pytest.raises(WGSLCheckError, match=r"kernel add_kernel of this float32 build uses float16"):
        check_wgsl(_Module(half), float16=False)
    assert check_wgsl(_Module(half)) == 1  # fine in a float16 build


def test_subgroup_matrix_kernels_are_checked_on_dawns_null_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CPU driver offers subgroup matrices; Dawn's null backend does, so Tint validates such kernels
    at build time too: a valid one passes, one without the extension enabled is an error naming it."""
    monkeypatch.setenv("MLCWEB_WGSL_CHECK", "require")
    head = "enable f16;\nenable subgroups;\nenable chromium_experimental_subgroup_matrix;\n"
    body = (
        "var<workgroup> t : array<f16, 256>;\n"
        "@compute @workgroup_size(32) fn mm_kernel() {\n"
        "  let a = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&t, 0u, false, 16u);\n"
        "  let b = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&t, 0u, true, 16u);\n"
        "  var c = subgroupMatrixMultiply<f32>(a, b);\n}\n"
    )
    assert check_matrix_wgsl({"mm_kernel": head + body}) == 1
    with pytest.raises(WGSLCheckError, match=r"kernel mm_kernel does not compile"):
        check_matrix_wgsl({"mm_kernel": body})  # the extension not enabled


def test_the_check_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLCWEB_WGSL_CHECK", "off")
    assert check_wgsl(_Module("not wgsl at all")) == 0


def test_workgroup_needs_follow_wgsl_size_rules() -> None:
    """Each workgroup variable is rounded up to 16 bytes and a kernel's are summed; the most over kernels."""
    from mlcweb.wgsl_check import workgroup_needs

    sources = {
        "a": "var<workgroup> q : array<f16, 2623>;\nvar<workgroup> m : array<f32, 512>;\n"
        "@compute @workgroup_size(8, 16, 1)\nfn a() {}",
        "b": "var<workgroup> x : array<vec4<f32>, 3>;\nvar<workgroup> y : f32;\n"
        "@compute @workgroup_size(256)\nfn b() {}",
    }
    needs = workgroup_needs(sources)
    assert (needs.storage_bytes, needs.invocations) == (5248 + 2048, 256)
    exe = tvm.compile(MatmulSoftmax, WEBGPU, relax_pipeline=mp.pipeline(WEBGPU))
    built = workgroup_needs(wgsl_sources(exe.mod))
    assert 0 < built.storage_bytes <= 32768 and built.invocations == 256  # the 16x16 GEMM tile

"""WidenGemmOperands: float16 GEMMs with float32 results widen their operands in producer stages.

Before: the fused kernel's reduction reads ``f32(x[.., k]) * f32(w[n, k])``, and the WebGPU schedule
keeps float16 tiles, so each multiply-add converts its operands. After: ``x_f32 = f32(x)`` and
``w_f32 = f32(w)`` are stages of the same kernel, inlined into the workgroup copies: float32 tiles, no
conversion in the multiply-adds, and the same products and sums (equal results on the CPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

import mlcweb_passes as mp
from mlcweb.wgsl_check import check_wgsl, wgsl_sources
from mlcweb_passes.webgpu.widen_gemm_operands import WIDE_CONV_NAME, WIDE_MATMUL_NAME, WidenGemmOperands

WEBGPU = tvm.target.Target(
    {"kind": "webgpu", "max_shared_memory_per_block": 32768},
    host={"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"},
)


def _layers() -> tvm.IRModule:
    """A linear layer (with bias, cast back to float16) and an NHWC convolution, float16 in, float32
    accumulators, as mixed precision and the layout passes leave them."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 64, 96), "float16"))
    w = relax.Var("w", relax.TensorType((128, 96), "float16"))
    b = relax.Var("b", relax.TensorType((128,), "float32"))
    img = relax.Var("img", relax.TensorType((1, 12, 12, 32), "float16"))
    k = relax.Var("k", relax.TensorType((64, 3, 3, 32), "float16"))
    with bb.function("main", [x, w, b, img, k]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w), out_dtype="float32"))
            y = bb.emit(relax.op.astype(relax.op.add(y, b), "float16"))
            conv = relax.op.nn.conv2d(
                img, k, padding=[1, 1, 1, 1], data_layout="NHWC", kernel_layout="OHWI", out_dtype="float32"
            )
            z = bb.emit(relax.op.astype(bb.emit(conv), "float16"))
            out = bb.emit_output(relax.Tuple([y, z]))
        bb.emit_func_output(out)
    with WEBGPU:
        return mp.LinearWeightLayout()(bb.get())


def _callees(mod: tvm.IRModule) -> list[str]:
    return sorted(gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))


def test_float16_gemms_widen_their_operands_in_producer_stages() -> None:
    before = _layers()
    after = WidenGemmOperands()(before)
    assert WIDE_MATMUL_NAME in _callees(after) and WIDE_CONV_NAME in _callees(after)
    assert not any(name.startswith("matmul_nt") and name != WIDE_MATMUL_NAME for name in _callees(after))
    gemm = after[WIDE_MATMUL_NAME].script()
    assert 'T.Cast("float32", x[' in gemm and 'T.Cast("float32", w[' in gemm  # the producer stages
    assert "x_f32[" in gemm and "w_f32[" in gemm  # ... which the reduction reads
    # a float32 GEMM has nothing to widen
    assert WidenGemmOperands()(_float32_linear()).script() == _float32_linear().script()


def _float32_linear() -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 32), "float32"))
    w = relax.Var("w", relax.TensorType((16, 32), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.op.permute_dims(w)))
        bb.emit_func_output(out)
    with WEBGPU:
        return mp.LinearWeightLayout()(bb.get())


def _run_cpu(mod: tvm.IRModule, args: list[np.ndarray]) -> list[np.ndarray]:
    exe = tvm.compile(mod, tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(exe, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in args])
    return [o.numpy() for o in out]


def test_the_results_are_the_same_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    args = [
        rng.standard_normal((2, 64, 96)).astype(np.float16),
        (rng.standard_normal((128, 96)) / 10).astype(np.float16),
        rng.standard_normal(128).astype(np.float32),
        rng.standard_normal((1, 12, 12, 32)).astype(np.float16),
        (rng.standard_normal((64, 3, 3, 32)) / 10).astype(np.float16),
    ]
    before, after = _run_cpu(_layers(), args), _run_cpu(WidenGemmOperands()(_layers()), args)
    for got, want in zip(after, before, strict=True):
        np.testing.assert_array_equal(got, want)
    x, w, b = (a.astype(np.float64) for a in args[:3])
    np.testing.assert_allclose(after[0].astype(np.float64), x @ w.T + b, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("widen", [True, False])
def test_webgpu_tiles_hold_float32_and_multiply_adds_convert_nothing(widen: bool) -> None:
    options = mp.PipelineOptions(widen_gemm_operands=widen)
    exe = tvm.compile(_layers(), WEBGPU, relax_pipeline=mp.pipeline(WEBGPU, options))
    sources = wgsl_sources(exe.mod)
    gemms = {name: code for name, code in sources.items() if "matmul_nt" in name or "conv2d" in name}
    assert len(gemms) == 2
    for code in gemms.values():
        tiles = [line for line in code.splitlines() if line.startswith("var<workgroup>")]
        multiply_adds = [line for line in code.splitlines() if "fma(" in line]
        assert tiles and multiply_adds
        if widen:
            assert all("f32" in line for line in tiles)
            assert not any("f32(" in line for line in multiply_adds)
        else:  # the float16 schedule this pass improves on: float16 tiles, a conversion per operand
            assert all("f16" in line for line in tiles)
            assert all("f32(" in line for line in multiply_adds)
    assert check_wgsl(exe.mod) >= 0  # Dawn compiles them (f16 checked as f32 where the adapter has none)

"""VectorElementwise: WebGPU elementwise kernels with 4 adjacent elements an invocation, their loads
``vec4`` where they walk the output's innermost axis; results against numpy on Dawn."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tvm
from tvm import relax

import mlcweb_passes as mp
from mlcweb.wgsl_check import wgsl_sources
from mlcweb_passes.schedules.vector_elementwise import VECTOR_CALLS, VectorElementwise

WEBGPU = tvm.target.Target({"kind": "webgpu"})
SHAPE = (2, 128, 320)  # 81920 outputs: past the rule's 65536

UNARY: dict[str, Callable[[Any], Any]] = {
    "exp": relax.op.exp,
    "tanh": relax.op.tanh,
    "sigmoid": relax.op.sigmoid,
    "sqrt": relax.op.sqrt,
    "sin": relax.op.sin,
    "cos": relax.op.cos,
    "log": relax.op.log,
    "floor": relax.op.floor,
    "fabs": relax.op.abs,
    "pow": lambda v: relax.op.power(v, relax.const(2.0, "float32")),
    "erf": relax.op.erf,  # written out by the rule as the rational form TVM lowers it to
}
SCALAR_ONLY: dict[str, Callable[[Any], Any]] = {"rsqrt": relax.op.rsqrt, "round": relax.op.round}


def _module(body: Callable[..., Any], dtype: str = "float16", shape: tuple[int, ...] = SHAPE) -> tvm.IRModule:
    """``cast(body(cast(x), r, bias), dtype)``: x and r of ``shape`` in ``dtype``, a float32 bias per column."""
    bb = relax.BlockBuilder()
    x, r = (relax.Var(n, relax.TensorType(shape, dtype)) for n in ("x", "r"))
    bias = relax.Var("bias", relax.TensorType((shape[-1],), "float32"))
    with bb.function("main", [x, r, bias]):
        with bb.dataflow():
            wide = bb.emit(relax.op.astype(x, "float32"))
            value = bb.emit(body(wide, relax.op.astype(r, "float32"), bias))
            out = bb.emit_output(bb.emit(relax.op.astype(value, dtype)))
        bb.emit_func_output(out)
    return bb.get()


def _kernel(mod: tvm.IRModule) -> tvm.tirx.PrimFunc:
    with WEBGPU:
        fused = mp.FuseOperators()(mod)
    (func,) = [f for _, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return func


def _wgsl(mod: tvm.IRModule) -> str:
    options = mp.PipelineOptions(dtype="float16")
    relax_pipeline, tir_pipeline = mp.pipeline(WEBGPU, options), mp.tir_pipeline(WEBGPU, options)
    exe = tvm.compile(
        mod, tvm.target.Target(WEBGPU, host="llvm"), relax_pipeline=relax_pipeline, tir_pipeline=tir_pipeline
    )
    (code,) = wgsl_sources(exe.mod).values()
    return code


@pytest.mark.parametrize("name", sorted(UNARY))
def test_the_intrinsics_it_takes_vectorise(name: str) -> None:
    """Each intrinsic of VECTOR_CALLS, and erf: one vec4 load of x, no loop over the vector's elements."""
    assert f"tirx.{name}" in VECTOR_CALLS or name == "erf"
    code = _wgsl(_module(lambda x, r, b: UNARY[name](x)))
    assert "for (var" not in code and "x_ptr : array<vec4<f16>>" in code


@pytest.mark.parametrize("name", sorted(SCALAR_ONLY))
def test_kernels_calling_other_intrinsics_are_left_to_the_fallback(name: str) -> None:
    """rsqrt and round would be a loop over the vector's elements: the rule declines them."""
    func = _kernel(_module(lambda x, r, b: SCALAR_ONLY[name](x)))
    assert VectorElementwise(min_elements=1).apply(func, WEBGPU, False) is None


def test_it_declines_short_rows_and_small_kernels_and_gathers_transposed_reads() -> None:
    def transposed(x: Any, r: Any, b: Any) -> Any:
        return relax.op.permute_dims(x, [0, 2, 1]) + relax.op.permute_dims(r, [0, 2, 1])

    code = _wgsl(_module(transposed))  # its stores are 4-wide; its reads one element each, as before
    assert "for (var" not in code and "x_ptr : array<f16>" in code
    odd = _kernel(_module(lambda x, r, b: x + r, shape=(2, 64, 30)))
    assert VectorElementwise(min_elements=1).apply(odd, WEBGPU, False) is None  # 30 columns: not 4-wide
    residual = _kernel(_module(lambda x, r, b: x + r + b, shape=(2, 64, 320)))
    assert VectorElementwise().apply(residual, WEBGPU, False) is None  # 40960 outputs: under 65536
    assert VectorElementwise(min_elements=1).apply(residual, WEBGPU, False) is not None


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_residual_bias_silu_and_gelu_match_pytorch_on_webgpu(dtype: str) -> None:
    """``gelu(x + bias) * silu(r) + r`` over 2 x 256 x 320 (above the rule's threshold; erf written out):
    float32 on SwiftShader within 2e-6 of PyTorch in float64, float16 on lavapipe within float16
    rounding; the library's kernel is the rule's."""
    import torch
    from attention_fixtures import LAVAPIPE_ICD
    from webgpu_node import LAVAPIPE, SWIFTSHADER, run_on_webgpu
    from webgpu_node import WEBGPU as NODE_TARGET

    if dtype == "float16" and not LAVAPIPE_ICD.is_file():
        pytest.skip("float16 needs Mesa's lavapipe")
    shape = (2, 256, 320)
    mod = _module(lambda x, r, b: relax.op.nn.gelu(x + b) * relax.op.nn.silu(r) + r, dtype, shape)
    assert VectorElementwise().apply(_kernel(mod), WEBGPU, False) is not None
    options = mp.PipelineOptions(dtype=dtype)
    relax_pipeline, tir_pipeline = mp.pipeline(NODE_TARGET, options), mp.tir_pipeline(NODE_TARGET, options)
    exe = tvm.compile(mod, NODE_TARGET, relax_pipeline=relax_pipeline, tir_pipeline=tir_pipeline)
    rng = np.random.default_rng(0)
    x, r = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    bias = rng.standard_normal(shape[-1]).astype(np.float32)
    got = run_on_webgpu(exe, "main", [x, r, bias], icd=LAVAPIPE if dtype == "float16" else SWIFTSHADER)
    h, rr = torch.from_numpy(x.astype(np.float64) + bias), torch.from_numpy(r.astype(np.float64))
    want = (torch.nn.functional.gelu(h) * torch.nn.functional.silu(rr) + rr).numpy()
    tol = 2e-6 if dtype == "float32" else 4e-3
    np.testing.assert_allclose(got.astype(np.float64), want.astype(dtype).astype(np.float64), rtol=tol, atol=tol)

"""WebGPUVectorStorage: storage buffers a kernel reads only in aligned 4-wide vectors become vec4 arrays.

Before: ``a_ptr: T.handle("float16")`` declared as 1024 halves and read ``a[T.Ramp(i * 4, 1, 4)]``, which
TVM's WGSL writes as four scalar loads rebuilt into a vector. After: ``a_ptr: T.handle("float16x4")``,
256 vectors, read ``a[i]`` (one ``vec4<f16>`` load). Buffers with an unaligned vector read, a scalar
read or any store keep their type.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from mlcweb.wgsl_check import wgsl_sources
from mlcweb_passes.webgpu.vector_storage import WebGPUVectorStorage, tir_pipeline, vector_storage


@T.prim_func(private=True)
def _kernel(
    a_ptr: T.handle("float16", "global"), b_ptr: T.handle("float16", "global"), c_ptr: T.handle("float16", "global")
) -> None:
    a = T.decl_buffer((1024,), "float16", data=a_ptr)
    b = T.decl_buffer((1028,), "float16", data=b_ptr)
    c = T.decl_buffer((1024,), "float16", data=c_ptr)
    for i in range(256):
        # a: aligned vector reads only; b: one read starts one element late; c: stored
        c[T.Ramp(i * 4, 1, 4)] = a[T.Ramp(i * 4, 1, 4)] + b[T.Ramp(i * 4 + 1, 1, 4)]


def _types(func: tvm.tirx.PrimFunc) -> list[str]:
    return [str(p.ty) for p in func.params]


def test_only_the_aligned_read_only_buffer_becomes_vectors() -> None:
    after = vector_storage(_kernel)
    assert _types(_kernel) == ['T.handle("float16", "global")'] * 3
    assert _types(after) == [
        'T.handle("float16x4", "global")',
        'T.handle("float16", "global")',
        'T.handle("float16", "global")',
    ]
    script = after.script()
    assert 'T.decl_buffer((256,), "float16x4"' in script and "a[i]" in script
    assert "b[T.Ramp(i * 4 + 1, 1, 4)]" in script and "c[i * 4:i * 4 + 4]" in script
    assert vector_storage(after).same_as(after)  # nothing left to rewrite


def test_the_module_pass_rewrites_every_kernel_and_leaves_others() -> None:
    mod = tvm.IRModule({"kernel": _kernel})
    after = WebGPUVectorStorage()(mod)
    assert _types(after["kernel"])[0] == 'T.handle("float16x4", "global")'


@pytest.mark.parametrize("dtype", ["float32"])
def test_a_gemm_reads_vec4_arrays_and_computes_the_same_on_webgpu(dtype: str) -> None:
    """An NHWC convolution through the whole pipeline with the vector-storage TIR pipeline: its operands
    are declared ``array<vec4<f32>>`` and it gives PyTorch's result on Dawn (SwiftShader)."""
    import torch
    from tvm import relax
    from webgpu_node import WEBGPU, run_on_webgpu

    import mlcweb_passes as mp

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 16, 16, 32), dtype))
    w = relax.Var("w", relax.TensorType((64, 32, 3, 3), dtype))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.conv2d(x, w, padding=[1, 1, 1, 1], data_layout="NHWC")))
        bb.emit_func_output(out)
    mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OIHW"]})(bb.get())
    options = mp.PipelineOptions(conv_layout="NHWC")  # vector_loads on by default
    assert mp.tir_pipeline(WEBGPU, options) == tir_pipeline()
    exe = tvm.compile(
        mod, WEBGPU, relax_pipeline=mp.pipeline(WEBGPU, options), tir_pipeline=mp.tir_pipeline(WEBGPU, options)
    )
    conv = next(code for name, code in wgsl_sources(exe.mod).items() if "conv2d" in name)
    assert conv.count("array<vec4<f32>>") == 2
    rng = np.random.default_rng(0)
    xa = rng.standard_normal((2, 16, 16, 32)).astype(np.float32)
    wa = (rng.standard_normal((64, 32, 3, 3)) / np.sqrt(32 * 9)).astype(np.float32)
    got = run_on_webgpu(exe, "main", [xa, wa])
    want = torch.nn.functional.conv2d(
        torch.from_numpy(xa.transpose(0, 3, 1, 2).copy()), torch.from_numpy(wa), padding=1
    )
    want_nhwc = want.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want_nhwc, rtol=0, atol=1e-5 * float(np.abs(want_nhwc).max()))

"""schedules/narrow_output: GEMMs and convolutions with a few output columns, a warp per output row.

Before: SD's last convolutions (``conv_out``, 320 -> 4 channels in the UNet, 128 -> 3 in the VAE) fell to
dlight's ``Matmul`` rule, their columns padded to a 32-wide tile. After: 32 lanes per output pixel
split the channels, every column accumulated in registers, one cross-lane sum per column. (An earlier
form that unrolled the columns, each reading A again, hung SwiftShader, the software adapter: A now
goes through registers once per step.) Numbers: the
portable kernel on lavapipe (float16) and SwiftShader (float32) against numpy in float64.
"""

import numpy as np
import pytest
import tvm
from tvm import relax

import mlcweb_passes as mp
from mlcweb.wgsl_check import SWIFTSHADER
from mlcweb_passes.schedules.narrow_output import NarrowOutput
from mlcweb_passes.webgpu.gemm import WebGPUMatmul


def _conv_out(dtype: str, channels: int, cols: int, size: int) -> tvm.IRModule:
    """``conv_out`` as ConvLayout leaves it: NHWC, OHWI kernel, float32 accumulation, bias, ``dtype`` out."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, size, size, channels), dtype))
    w = relax.Var("w", relax.TensorType((cols, 3, 3, channels), dtype))
    b = relax.Var("b", relax.TensorType((cols,), "float32"))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            y = relax.op.nn.conv2d(
                x, w, padding=[1, 1, 1, 1], data_layout="NHWC", kernel_layout="OHWI", out_dtype="float32"
            )
            out = bb.emit_output(bb.emit(relax.op.astype(relax.op.add(bb.emit(y), b), dtype)))
        bb.emit_func_output(out)
    return bb.get()


def _kernel(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.tirx.PrimFunc:
    with target:
        fused = mp.FuseOperators()(mod)
    (func,) = [f for _, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return func.with_attr("global_symbol", "conv")


def test_a_few_columns_get_a_warp_per_row() -> None:
    from webgpu_node import WEBGPU

    func = _kernel(_conv_out("float16", 320, 4, 16), WEBGPU)
    sch = NarrowOutput().apply(func, WEBGPU, False)
    assert sch is not None
    script = sch.mod.script()
    assert 'T.thread_binding(T.int64(128), thread="blockIdx.x")' in script  # 512 pixels, 4 a workgroup
    assert 'T.sblock("pad_temp")' not in script  # the zero padding computed as A is read into registers
    source = tvm.compile(sch.mod, WEBGPU).mod.imports[0].inspect_source()
    assert "@workgroup_size(32, 4, 1)" in source and "vec2<f16>" in source  # 320 / 32 lanes: 2 wide
    subgroups = tvm.target.Target({"kind": "webgpu", "supports_subgroups": True, "thread_warp_size": 32})
    sch32 = NarrowOutput().apply(func, subgroups, False)
    assert sch32 is not None
    assert "subgroupShuffle" in tvm.compile(sch32.mod, subgroups).mod.imports[0].inspect_source()
    order = [type(rule) for rule in mp.default_rules(WEBGPU)]
    assert order.index(NarrowOutput) < order.index(WebGPUMatmul)


def test_leaves_wide_outputs_other_targets_and_odd_reductions() -> None:
    from webgpu_node import WEBGPU

    assert NarrowOutput().apply(_kernel(_conv_out("float16", 320, 16, 16), WEBGPU), WEBGPU, False) is None
    narrow = _kernel(_conv_out("float16", 320, 4, 16), WEBGPU)
    assert NarrowOutput().apply(narrow, tvm.target.Target({"kind": "cuda", "arch": "sm_90"}), False) is None
    assert NarrowOutput().apply(_kernel(_conv_out("float16", 40, 4, 16), WEBGPU), WEBGPU, False) is None  # 40 % 32


@pytest.mark.parametrize(("dtype", "channels", "cols"), [("float16", 320, 4), ("float32", 128, 3)])
def test_matches_numpy_on_webgpu(dtype: str, channels: int, cols: int) -> None:
    """The UNet's and the VAE's ``conv_out`` shapes (channels, columns) on 16x16 pixels, through the
    pipeline (the default rules take it first): within float16 rounding of the output (or 1e-5)."""
    from webgpu_node import LAVAPIPE, WEBGPU, run_on_webgpu

    mod = _conv_out(dtype, channels, cols, 16)
    exe = tvm.compile(mod, WEBGPU, relax_pipeline=mp.pipeline(WEBGPU))
    assert "@workgroup_size(32, 4, 1)" in exe.mod.imports[0].imports[0].inspect_source()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 16, channels)).astype(dtype)
    w = (rng.standard_normal((cols, 3, 3, channels)) / np.sqrt(9 * channels)).astype(dtype)
    b = rng.standard_normal(cols).astype(np.float32)
    got = run_on_webgpu(exe, "main", [x, w, b], icd=LAVAPIPE if dtype == "float16" else SWIFTSHADER)
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.broadcast_to(b, (2, 16, 16, cols)).copy()
    for dy in range(3):
        for dx in range(3):
            want += padded[:, dy : dy + 16, dx : dx + 16, :] @ w[:, dy, dx, :].astype(np.float64).T
    tolerance = 2**-10 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=0, atol=tolerance * float(np.abs(want).max()))

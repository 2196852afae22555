from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from testutil import H100, as_numpy, build, function_names, nvcc_ptx, op_names, to_tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp
from mlcweb_passes.cuda.tensor_core_matmul import TensorCoreMatmul
from mlcweb_passes.rewrites import split_k_conv
from mlcweb_passes.rewrites.split_k_conv import SplitPolicy, choose_splits, webgpu_split_policy
from mlcweb_passes.targets import ASYNC_COPY_CONFIG

CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})


@I.ir_module
class DeepConv:
    """A deep UNet convolution as ConvLayout and mixed precision leave it (scaled down): NHWC float16,
    OHWI kernel parameter, float32 accumulation, a cast and a bias after it."""

    @R.function
    def main(
        x: R.Tensor((2, 8, 8, 128), "float16"), w: R.Tensor((64, 3, 3, 128), "float16"), b: R.Tensor((64,), "float16")
    ) -> R.Tensor((2, 8, 8, 64), "float16"):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1], data_layout="NHWC", kernel_layout="OHWI", out_dtype="float32")
            out = R.add(R.astype(y, "float16"), b)
            R.output(out)
        return out


@I.ir_module
class WiderConv:
    """DeepConv with 256 input channels."""

    @R.function
    def main(x: R.Tensor((2, 8, 8, 256), "float16"), w: R.Tensor((64, 3, 3, 256), "float16")) -> R.Tensor(
        (2, 8, 8, 64), "float16"
    ):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1], data_layout="NHWC", kernel_layout="OHWI", out_dtype="float32")
            out = R.astype(y, "float16")
            R.output(out)
        return out


@I.ir_module
class StridedConv:
    """A downsampling convolution: stride 2, asymmetric padding, no out_dtype (float16 out)."""

    @R.function
    def main(x: R.Tensor((1, 9, 9, 64), "float16"), w: R.Tensor((32, 3, 3, 64), "float16")) -> R.Tensor(
        (1, 5, 4, 32), "float16"
    ):
        with R.dataflow():
            y = R.nn.conv2d(x, w, strides=[2, 2], padding=[1, 0, 1, 0], data_layout="NHWC", kernel_layout="OHWI")
            R.output(y)
        return y


def test_convolution_becomes_a_batch_of_slices_and_a_sum() -> None:
    after = mp.SplitKConv(splits=4)(DeepConv)
    assert "relax.nn.conv2d" not in op_names(after)
    assert {"conv2d_split_k", "split_k_sum"} <= set(function_names(after))
    partial = after["conv2d_split_k"]
    assert int(partial.attrs["op_pattern"]) == split_k_conv.OPAQUE  # fusion adds nothing to it
    # inputs viewed as [..., 4 slices, 32 channels]; partial sums [slice, n, h, w, out] in float32
    shapes = [[int(d) for d in p.shape] for p in partial.params]
    assert shapes == [[2, 8, 8, 4, 32], [64, 3, 3, 4, 32], [4, 2, 8, 8, 64]]
    assert str(partial.params[2].dtype) == "float32"


def test_the_kernel_reshape_is_lifted_with_the_weights() -> None:
    """Applied before lifting (as ``mlcweb build`` does), the stored kernel is the sliced view."""
    lifted = mp.split_transform_params(mp.SplitKConv(splits=4)(DeepConv))
    shapes = [[int(d) for d in p.ty.shape] for p in lifted.deploy["main"].params[1:]]
    assert [64, 3, 3, 4, 32] in shapes and [64, 3, 3, 128] not in shapes
    assert op_names(lifted.deploy).count("relax.reshape") == 1  # the activation's view alone


@pytest.mark.parametrize(("module", "splits"), [(DeepConv, 2), (DeepConv, 4), (StridedConv, 8)])
def test_split_convolution_computes_the_same(module: tvm.IRModule, splits: int) -> None:
    """Against PyTorch's float32 convolution of the same float16 inputs, within two float16 steps at the
    output's scale; and against the unsplit build where that also accumulates in float32."""
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal([int(d) for d in p.ty.shape]).astype(np.float16) for p in module["main"].params]
    after = mp.SplitKConv(splits=splits)(module)
    assert "relax.nn.conv2d" not in op_names(after)
    got = as_numpy(build(after)["main"](*to_tvm(*arrays)))[0].astype(np.float32)

    conv = next(b.value for b in module["main"].body.blocks[0].bindings if "conv2d" in str(b.value.op))
    top, left, bottom, right = (int(p) for p in conv.attrs.padding)
    x, w = (torch.from_numpy(a).float() for a in arrays[:2])
    ref = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x.permute(0, 3, 1, 2), (left, right, top, bottom)),
        w.permute(0, 3, 1, 2),
        stride=[int(s) for s in conv.attrs.strides],
    ).permute(0, 2, 3, 1)
    if len(arrays) == 3:  # DeepConv's float16 bias
        ref = ref.half().float() + torch.from_numpy(arrays[2]).float()
    step = float(ref.abs().max()) * 2.0**-10  # float16's spacing at the largest output
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=2 * step)
    if str(conv.attrs.out_dtype) == "float32":  # without it, the unsplit kernel accumulates in float16
        expected = as_numpy(build(module)["main"](*to_tvm(*arrays)))[0].astype(np.float32)
        np.testing.assert_allclose(got, expected, rtol=0, atol=2 * step)


def test_widened_partials_compute_the_same_bit_for_bit() -> None:
    """``widen=True`` (WebGPU) casts the operands in producer stages of the partial GEMM kernel: the same
    float32 products and sums as casting them inside the reduction."""
    widened = mp.SplitKConv(splits=4, widen=True)(DeepConv)
    script = widened["conv2d_split_k"].script()
    assert 'T.Cast("float32", x[' in script and 'T.Cast("float32", w[' in script and "x_f32[" in script
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal([int(d) for d in p.ty.shape]).astype(np.float16) for p in DeepConv["main"].params]
    got = as_numpy(build(widened)["main"](*to_tvm(*arrays)))[0]
    want = as_numpy(build(mp.SplitKConv(splits=4)(DeepConv))["main"](*to_tvm(*arrays)))[0]
    np.testing.assert_array_equal(got, want)


@I.ir_module
class LeftAlone:
    @R.function
    def main(
        x: R.Tensor((2, 4, 4, 128), "float32"),
        w: R.Tensor((64, 3, 3, 128), "float32"),
        xc: R.Tensor((2, 128, 4, 4), "float16"),
        wc: R.Tensor((64, 128, 3, 3), "float16"),
        wg: R.Tensor((128, 3, 3, 64), "float16"),
    ) -> R.Tuple:
        with R.dataflow():
            a = R.nn.conv2d(x, w, padding=[1, 1, 1, 1], data_layout="NHWC", kernel_layout="OHWI")  # float32
            b = R.nn.conv2d(xc, wc, padding=[1, 1, 1, 1], out_dtype="float32")  # NCHW
            c = R.nn.conv2d(R.astype(x, "float16"), wg, groups=2, data_layout="NHWC", kernel_layout="OHWI")  # grouped
            out = (a, b, c)
            R.output(out)
        return out


def test_other_convolutions_are_left_alone() -> None:
    after = mp.SplitKConv(splits=4)(LeftAlone)
    assert op_names(after).count("relax.nn.conv2d") == 3
    assert op_names(mp.SplitKConv(splits=3)(DeepConv)).count("relax.nn.conv2d") == 1  # 128 channels: no 3 slices


def test_split_count_follows_the_h100_measurements() -> None:
    """``benchmarks/split_k.py`` on an H100: the fastest count (or within 6% of it) for each UNet shape."""
    assert choose_splits(128, 1280, 1280, 9, H100.sm_count) == 4  # 8x8 latents: 0.145 ms unsplit, 0.050 in 4
    assert choose_splits(128, 1280, 2560, 9, H100.sm_count) == 8  # 0.307 -> 0.051
    assert choose_splits(512, 1280, 1280, 9, H100.sm_count) == 4  # 16x16: 0.148 -> 0.072
    assert choose_splits(512, 1280, 640, 9, H100.sm_count) == 2  # 0.067 -> 0.050; 4 slices of 160 channels: 0.102
    assert choose_splits(8192, 320, 640, 9, H100.sm_count) == 1  # 64x64 latents fill the GPU
    assert choose_splits(512, 1280, 640, 1, H100.sm_count) == 1  # 1x1 shortcut: a short reduction already
    assert choose_splits(128, 1280, 1280, 9, 8) == 1  # a small GPU is full


def test_a_policy_sets_the_tiles_waves_and_shortest_slice() -> None:
    """The tile and waves decide whether to split, the shortest slice how finely (WebGPU's subgroup-matrix
    tiles: 64x128, slices of 128 channels); the pipeline hands its policy to the pass."""
    webgpu = webgpu_split_policy((64, 128))
    assert webgpu == SplitPolicy((64, 128), 2.0, 1152)
    assert choose_splits(128, 1280, 1280, 9, 128, webgpu) == 10  # 20 tiles; slices of 128 channels
    assert choose_splits(2048, 640, 640, 9, 128, webgpu) == 5  # 160 tiles; CUDA's 80 make 2 slices of 320
    assert choose_splits(2048, 640, 640, 9, 128) == 2
    assert choose_splits(8192, 320, 320, 9, 128, webgpu) == 1  # 384 tiles: two waves
    with pytest.raises(ValueError, match="positive"):
        SplitPolicy((64, 0))
    options = mp.PipelineOptions(dtype="float16", split_k_policy=SplitPolicy(min_slice=1152), gpu=H100)
    with CUDA:
        after = mp.phases(CUDA, options)["weights"](DeepConv)
    assert "conv2d_split_k" not in function_names(after)  # 3 x 3 x 128 = 1152 products: halves would be 576
    with CUDA:
        fine = mp.PipelineOptions(dtype="float16", split_k_policy=SplitPolicy(min_slice=576), gpu=H100)
        split = mp.phases(CUDA, fine)["weights"](DeepConv)
    assert "conv2d_split_k" in function_names(split)
    # 256 channels (2304 products): CUDA's default keeps them whole, WebGPU's splits them in two
    with CUDA:
        kept = mp.phases(CUDA, mp.PipelineOptions(dtype="float16", gpu=H100))["weights"](WiderConv)
    assert "conv2d_split_k" not in function_names(kept)
    target = tvm.target.Target({"kind": "webgpu"}, host={"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"})
    with target:
        halves = mp.phases(target, mp.PipelineOptions(dtype="float16"))["weights"](WiderConv)
    assert "conv2d_split_k" in function_names(halves)


def _split_kernel(target: tvm.target.Target) -> tvm.IRModule:
    with target:
        fused = mp.FuseOperators()(mp.SplitKConv(splits=4)(DeepConv))
    return fused


def test_slices_are_tensor_core_gemm_batches_and_the_epilogue_joins_the_sum() -> None:
    fused = _split_kernel(CUDA)
    kernels = sorted(n for n in function_names(fused) if n != "main" and not n.startswith("reshape"))  # views
    assert kernels == ["conv2d_split_k", "fused_split_k_sum_cast_add"]
    sch = TensorCoreMatmul().apply(fused["conv2d_split_k"], CUDA, False)
    assert sch is not None
    script = sch.mod.script()
    assert "wmma.matrix_a" in script
    assert 'T.thread_binding(4, thread="blockIdx.y")' in script  # a GEMM (of 128 x 64 x 288) per slice


def test_pipeline_splits_only_for_tensor_core_targets() -> None:
    def weights(target: tvm.target.Target, **options: object) -> list[str]:
        phase = mp.phases(target, mp.PipelineOptions(conv_layout="NHWC", gpu=H100, **options))["weights"]  # type: ignore[arg-type]
        return [p.info.name for p in phase.passes]

    assert "mlcweb.SplitKConv" in weights(CUDA)
    assert "mlcweb.SplitKConv" not in weights(tvm.target.Target("llvm"))
    assert "mlcweb.SplitKConv" not in weights(CUDA, split_k=False)


def test_split_kernel_source_compiles_with_nvcc(tmp_path: Path) -> None:
    """The tiles over a batch of slices, with the padding inlined into their copies, as valid CUDA."""
    with tvm.transform.PassContext(config=ASYNC_COPY_CONFIG):
        exe = tvm.compile(mp.SplitKConv(splits=4)(DeepConv), CUDA, relax_pipeline=mp.pipeline(CUDA))
    source = exe.mod.imports[0].imports[0].inspect_source()  # VM executable -> host (llvm) -> cuda
    assert "wmma.mma.sync" in nvcc_ptx(source, tmp_path)

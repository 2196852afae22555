"""The GPU schedule rules of mlcweb_passes: what they match, what schedule they make, and that it compiles.

Numerics on a GPU are checked end to end by ``benchmarks/sd_gpu.py`` (UNet and VAE against PyTorch).
"""

import dataclasses
import re

import numpy as np
import pytest
import tvm
from testutil import H100
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp
from mlcweb.wgsl_check import wgsl_sources
from mlcweb_passes.cuda.tensor_core_matmul import GemmShape, TensorCoreMatmul, TensorCoreTile, choose_tile
from mlcweb_passes.schedules.apply_database import preload_tensor_intrinsics
from mlcweb_passes.schedules.channels_last_norm import ChannelsLastNorm
from mlcweb_passes.schedules.row_reduction import RowReduction
from mlcweb_passes.schedules.short_row_reduction import ShortRowReduction
from mlcweb_passes.schedules.skinny_matmul import SkinnyMatmul
from mlcweb_passes.targets import ASYNC_COPY_CONFIG, gpu_facts

CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})


@I.ir_module
class GroupNormSiLU:
    @R.function
    def main(
        x: R.Tensor((2, 64, 32, 32), "float32"), g: R.Tensor((64,), "float32"), b: R.Tensor((64,), "float32")
    ) -> R.Tensor((2, 64, 32, 32), "float16"):
        with R.dataflow():
            y = R.nn.group_norm(x, g, b, num_groups=32, channel_axis=1, axes=[2, 3])
            out = R.astype(R.multiply(y, R.sigmoid(y)), "float16")
            R.output(out)
        return out


@I.ir_module
class Attention:
    @R.function
    def main(q: R.Tensor((8, 256, 40), "float16"), k: R.Tensor((8, 40, 256), "float16")) -> R.Tensor(
        (8, 256, 256), "float16"
    ):
        with R.dataflow():
            s = R.astype(R.matmul(q, k, out_dtype="float32"), "float16")
            R.output(s)
        return s


def _kernel(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.tirx.PrimFunc:
    with target:
        fused = mp.FuseOperators()(mod)
    funcs = [f for _, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 1
    return funcs[0]


def _launches(func: tvm.tirx.PrimFunc) -> list[int]:
    """Extents of the loops bound to blockIdx.x, in order: one per kernel of the function."""
    pattern = r'T\.thread_binding\(T\.int64\((\d+)\), thread="blockIdx\.x"\)'
    return [int(n) for n in re.findall(pattern, func.script())]


@pytest.mark.parametrize("kind", ["cuda", "webgpu"])
def test_group_norm_gets_a_block_per_row_then_a_thread_per_element(kind: str) -> None:
    target = CUDA if kind == "cuda" else tvm.target.Target({"kind": "webgpu"})
    func = _kernel(GroupNormSiLU, target)
    sch = RowReduction().apply(func, target, False)
    assert sch is not None
    launches = _launches(sch.mod["main"])
    elements, threads = 2 * 64 * 32 * 32, 256
    assert sorted(launches) == [2 * 32, elements // threads]  # rows = batch x groups; then every element
    # dlight's rule, for comparison, has only the batch axis for thread blocks
    dlight = tvm.s_tir.dlight.gpu.GeneralReduction().apply(func, target, False)
    assert _launches(dlight.mod["main"]) == [2]


def test_short_group_norm_rows_keep_their_consumer_in_one_kernel() -> None:
    func = _kernel(GroupNormSiLU, CUDA).with_attr("global_symbol", "norm")  # 64 rows of 2 x 32 x 32
    sch = RowReduction(fuse_below=2048).apply(func, CUDA, False)
    assert sch is not None and _launches(sch.mod["main"]) == [2 * 32]  # a block per row, no second kernel
    source = tvm.compile(sch.mod, CUDA).mod.imports[0].inspect_source()
    assert source.count("__global__") == 2  # one kernel: its declaration and definition
    assert "__syncthreads" in source  # the row's totals reach every thread before it normalises
    longer = RowReduction(fuse_below=1024).apply(func, CUDA, False)
    assert sorted(_launches(longer.mod["main"])) == [2 * 32, 2 * 64 * 32 * 32 // 256]  # two kernels, as before
    default = next(r for r in mp.default_rules(CUDA) if isinstance(r, RowReduction))
    assert default.fuse_below == 10240
    webgpu = tvm.target.Target({"kind": "webgpu"})
    on_webgpu = RowReduction(fuse_below=2048).apply(_kernel(GroupNormSiLU, webgpu), webgpu, False)
    assert _launches(on_webgpu.mod["main"]) == [2 * 32]  # WebGPU too: one dispatch instead of two


def test_one_image_short_rows_keep_their_consumer_in_one_kernel_and_match_pytorch() -> None:
    """One image (SD-Turbo's unguided UNet, the VAE): the norm's statistics are indexed ``[0, group]``, a
    unit axis with no loop, which had sent RowReduction back to two kernels. The 8x8 level's 1280-channel
    norm and SiLU in one WebGPU kernel of a workgroup per group, on SwiftShader within 1e-5 of PyTorch."""
    import torch
    from webgpu_node import WEBGPU, run_on_webgpu

    mod = _group_norm_silu(1280, 8)
    sch = RowReduction(fuse_below=10240).apply(_kernel(mod, WEBGPU).with_attr("global_symbol", "norm"), WEBGPU, False)
    assert sch is not None and _launches(sch.mod["main"]) == [32]
    exe = tvm.compile(mod, WEBGPU, relax_pipeline=mp.pipeline(WEBGPU))
    assert len([name for name in wgsl_sources(exe.mod) if "group_norm" in name]) == 1
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((1, 8, 8, 1280)) + 1).astype(np.float32)
    g, b = (
        (1 + 0.1 * rng.standard_normal(1280)).astype(np.float32),
        (0.1 * rng.standard_normal(1280)).astype(np.float32),
    )
    got = run_on_webgpu(exe, "main", [x, g, b])
    y = torch.nn.functional.group_norm(
        torch.from_numpy(x).permute(0, 3, 1, 2), 32, torch.from_numpy(g), torch.from_numpy(b)
    )
    want = torch.nn.functional.silu(y).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


@I.ir_module
class GroupNormNHWC:
    """A resnet's norm and SiLU at the UNet's 64x64 level as ConvLayout leaves it: channels last, groups of
    10 contiguous channels."""

    @R.function
    def main(
        x: R.Tensor((2, 64, 64, 320), "float16"), g: R.Tensor((320,), "float16"), b: R.Tensor((320,), "float16")
    ) -> R.Tensor((2, 64, 64, 320), "float16"):
        with R.dataflow():
            y = R.astype(R.nn.group_norm(x, g, b, num_groups=32, channel_axis=3, axes=[1, 2]), "float32")
            out = R.astype(R.multiply(y, R.sigmoid(y)), "float16")
            R.output(out)
        return out


def test_channels_last_group_norm_splits_the_pixels_across_thread_blocks() -> None:
    func = _kernel(GroupNormNHWC, CUDA).with_attr("global_symbol", "norm")
    sch = ChannelsLastNorm(H100).apply(func, CUDA, False)
    assert sch is not None
    # partial sums: 2 images x 128 chunks of 32 pixels; totals: a block per (image, group); normalise: a
    # block per pixel, its threads 2 channels each
    assert _launches(sch.mod["main"]) == [2 * 128, 2 * 32, 2 * 64 * 64]
    source = tvm.compile(sch.mod, CUDA).mod.imports[0].inspect_source()
    kernels = source.split("__global__")[4:]  # after the three declarations
    assert len(kernels) == 3
    assert "*(half2*)(x_ptr" in kernels[0] and "__launch_bounds__(160)" in kernels[0]  # 320 channels / 2
    assert "__shfl_down_sync" in kernels[1]  # the totals meet across threads
    assert "*(half2*)(compute_intermediate" in kernels[2] or "half2" in kernels[2]
    # RowReduction's schedule of the same function: a block per (image, group)
    assert sorted(_launches(RowReduction().apply(func, CUDA, False).mod["main"])) == [64, 2 * 64 * 64 * 320 // 256]


def test_channels_last_norm_leaves_other_layouts_sizes_and_targets_to_row_reduction() -> None:
    assert ChannelsLastNorm(H100).apply(_kernel(GroupNormSiLU, CUDA), CUDA, False) is None  # NCHW
    assert ChannelsLastNorm(H100, min_pixels=8192).apply(_kernel(GroupNormNHWC, CUDA), CUDA, False) is None
    llvm = tvm.target.Target("llvm")
    assert ChannelsLastNorm(H100).apply(_kernel(GroupNormNHWC, llvm), llvm, False) is None
    order = [type(rule) for rule in mp.default_rules(CUDA)]
    assert order.index(ChannelsLastNorm) < order.index(RowReduction)
    assert ChannelsLastNorm(H100).apply(_kernel(Attention, CUDA), CUDA, False) is None


def test_row_reduction_leaves_matmuls_and_short_rows_to_other_rules() -> None:
    assert RowReduction().apply(_kernel(Attention, CUDA), CUDA, False) is None
    short = RowReduction(min_row_length=4096).apply(_kernel(GroupNormSiLU, CUDA), CUDA, False)
    assert short is None  # rows of 2 x 32 x 32 = 2048
    assert RowReduction().apply(_kernel(GroupNormSiLU, CUDA), tvm.target.Target("llvm"), False) is None


@I.ir_module
class LayerNorm:
    """A transformer block's first norm at the UNet's 64x64 level: 8192 tokens of 320 channels."""

    @R.function
    def main(
        x: R.Tensor((2, 4096, 320), "float16"), g: R.Tensor((320,), "float16"), b: R.Tensor((320,), "float16")
    ) -> R.Tensor((2, 4096, 320), "float16"):
        with R.dataflow():
            out = R.nn.layer_norm(x, g, b, axes=[-1])
            R.output(out)
        return out


def test_layer_norm_gets_a_warp_per_row_and_no_shared_memory() -> None:
    func = _kernel(LayerNorm, CUDA).with_attr("global_symbol", "norm")
    sch = ShortRowReduction().apply(func, CUDA, False)
    assert sch is not None
    assert _launches(sch.mod["main"]) == [2 * 4096 // 4]  # 4 rows (warps) per thread block
    source = tvm.compile(sch.mod, CUDA).mod.imports[0].inspect_source()
    kernel = source.split("__global__")[-1]
    assert "__launch_bounds__(128)" in kernel
    assert kernel.count("__shfl_down_sync") == 2 * 5  # mean and variance: five shuffles each
    # every lane keeps the row's totals in registers: no shared memory to race on, no barrier
    assert "__shared__" not in kernel and "__syncthreads" not in kernel
    order = [type(rule) for rule in mp.default_rules(CUDA)]
    assert order.index(ShortRowReduction) < order.index(tvm.s_tir.dlight.gpu.GeneralReduction)


def test_short_row_reduction_leaves_long_or_few_rows_and_other_targets() -> None:
    assert ShortRowReduction().apply(_kernel(GroupNormSiLU, CUDA), CUDA, False) is None  # 64 rows
    assert ShortRowReduction(max_row_length=256).apply(_kernel(LayerNorm, CUDA), CUDA, False) is None
    assert ShortRowReduction().apply(_kernel(Attention, CUDA), CUDA, False) is None  # a matmul
    llvm = tvm.target.Target("llvm")
    assert ShortRowReduction().apply(_kernel(LayerNorm, llvm), llvm, False) is None


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_layer_norm_on_webgpu_takes_a_row_per_32_lanes_and_matches_numpy(dtype: str) -> None:
    """On WebGPU the same rule: 4 rows of 32 invocations a workgroup (without subgroups each reduction
    is a tree in workgroup memory), dlight's 256 invocations a row before. 2 x 1024 rows of 320 on Dawn:
    float32 on SwiftShader within 2e-6 of float64 numpy, float16 on lavapipe within its rounding."""
    from attention_fixtures import LAVAPIPE_ICD
    from tvm import relax
    from webgpu_node import LAVAPIPE, SWIFTSHADER, run_on_webgpu
    from webgpu_node import WEBGPU as NODE_TARGET

    webgpu = tvm.target.Target({"kind": "webgpu"})
    sch = ShortRowReduction().apply(_kernel(LayerNorm, webgpu).with_attr("global_symbol", "norm"), webgpu, False)
    assert sch is not None and _launches(sch.mod["main"]) == [2 * 4096 // 4]
    if dtype == "float16" and not LAVAPIPE_ICD.is_file():
        pytest.skip("float16 needs Mesa's lavapipe")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 1024, 320), dtype))
    g, b = (relax.Var(n, relax.TensorType((320,), dtype)) for n in ("g", "b"))
    with bb.function("main", [x, g, b]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.layer_norm(x, g, b, axes=[-1])))
        bb.emit_func_output(out)
    options = mp.PipelineOptions(dtype=dtype)
    relax_pipeline, tir_pipeline = mp.pipeline(NODE_TARGET, options), mp.tir_pipeline(NODE_TARGET, options)
    exe = tvm.compile(bb.get(), NODE_TARGET, relax_pipeline=relax_pipeline, tir_pipeline=tir_pipeline)
    (code,) = [c for name, c in wgsl_sources(exe.mod).items() if "layer_norm" in name]
    assert "@workgroup_size(32, 4, 1)" in code
    rng = np.random.default_rng(0)
    xa = (2 * rng.standard_normal((2, 1024, 320)) + 0.5).astype(dtype)
    ga, ba = (1 + 0.1 * rng.standard_normal(320)).astype(dtype), (0.1 * rng.standard_normal(320)).astype(dtype)
    got = run_on_webgpu(exe, "main", [xa, ga, ba], icd=LAVAPIPE if dtype == "float16" else SWIFTSHADER)
    x64 = xa.astype(np.float64)
    want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5) * ga + ba
    tol = 2e-6 if dtype == "float32" else 8e-3
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=0, atol=tol)


def test_head_dim_40_matmul_goes_to_tensor_cores() -> None:
    func = _kernel(Attention, CUDA)
    plain = tvm.s_tir.dlight.gpu.Matmul().apply(func, CUDA, False)
    assert "wmma" not in plain.mod.script()  # dlight keeps K=40 on CUDA cores
    sch = TensorCoreMatmul().apply(func, CUDA, False)
    assert sch is not None and "wmma.matrix_a" in sch.mod.script()
    assert TensorCoreMatmul().apply(func, tvm.target.Target({"kind": "cuda", "arch": "sm_61"}), False) is None


def test_default_rules_compile_both_for_cuda() -> None:
    for mod in (GroupNormSiLU, GroupNormNHWC, Attention):
        exe = tvm.compile(mod, CUDA, relax_pipeline=mp.pipeline(CUDA))
        assert exe is not None


@I.ir_module
class ConvNHWC:
    """A UNet convolution as ConvLayout leaves it: NHWC activations, OHWI kernel, float32 accumulation."""

    @R.function
    def main(x: R.Tensor((2, 32, 32, 128), "float16"), w: R.Tensor((256, 3, 3, 128), "float16")) -> R.Tensor(
        (2, 32, 32, 256), "float16"
    ):
        with R.dataflow():
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1], data_layout="NHWC", kernel_layout="OHWI", out_dtype="float32")
            out = R.astype(y, "float16")
            R.output(out)
        return out


@I.ir_module
class LinearKN:
    """A linear layer after weight lifting: the weight stored [in, out], so N, not K, is contiguous."""

    @R.function
    def main(x: R.Tensor((1, 256, 320), "float16"), w: R.Tensor((320, 640), "float16")) -> R.Tensor(
        (1, 256, 640), "float16"
    ):
        with R.dataflow():
            out = R.astype(R.matmul(x, w, out_dtype="float32"), "float16")
            R.output(out)
        return out


def test_convolution_gets_the_chosen_tile_with_async_copies() -> None:
    func = _kernel(ConvNHWC, CUDA).with_attr("global_symbol", "conv")
    shape = GemmShape(batch=1, m=2 * 32 * 32, n=256, k=9 * 128)
    tile = choose_tile(shape, H100)
    assert tile == TensorCoreTile(2, 2, 2, 2, 2)  # 16x2 blocks of 128x128 are under half a wave of 132 SMs
    sch = TensorCoreMatmul().apply(func, CUDA, False)
    assert sch is not None
    script = sch.mod.script()
    assert "wmma.matrix_a" in script and "software_pipeline_async_stages" in script
    assert _launches(sch.mod["main"]) == [(2048 // tile.block_m) * (256 // tile.block_n)]
    with tvm.transform.PassContext(config=ASYNC_COPY_CONFIG):
        source = tvm.compile(sch.mod, CUDA).mod.imports[0].inspect_source()
    assert "cp.async.cg.shared.global" in source and "wmma::mma_sync" in source


@I.ir_module
class TimeEmbeddingLinear:
    """A resnet's time-embedding projection after LinearWeightLayout: two rows, the weight [out, in]."""

    @R.function
    def main(
        t: R.Tensor((2, 1280), "float16"), w: R.Tensor((640, 1280), "float16"), b: R.Tensor((640,), "float32")
    ) -> R.Tensor((2, 640), "float16"):
        with R.dataflow():
            h = R.add(R.astype(R.matmul(t, R.permute_dims(w), out_dtype="float32"), "float32"), b)
            out = R.astype(R.multiply(h, R.sigmoid(h)), "float16")
            R.output(out)
        return out


def test_few_row_gemm_gets_a_warp_per_column() -> None:
    func = _kernel(mp.LinearWeightLayout()(TimeEmbeddingLinear), CUDA).with_attr("global_symbol", "linear")
    sch = SkinnyMatmul().apply(func, CUDA, False)
    assert sch is not None
    assert _launches(sch.mod["main"]) == [640 // 4]  # four warps, one output column each, per block
    source = tvm.compile(sch.mod, CUDA).mod.imports[0].inspect_source()
    assert "__shfl_down_sync" in source  # the lanes' partial sums meet in a warp reduction
    assert "*(uint4*)" in source  # 16-byte loads of the weight rows
    order = [type(rule) for rule in mp.default_rules(CUDA)]
    assert order.index(SkinnyMatmul) < order.index(tvm.s_tir.dlight.gpu.Matmul)


def test_skinny_matmul_leaves_tall_gemms_and_other_targets() -> None:
    assert SkinnyMatmul().apply(_kernel(ConvNHWC, CUDA), CUDA, False) is None  # 2048 rows
    linear = _kernel(mp.LinearWeightLayout()(TimeEmbeddingLinear), CUDA)
    assert SkinnyMatmul().apply(linear, CUDA, False) is not None
    assert SkinnyMatmul().apply(linear, tvm.target.Target("vulkan"), False) is None
    float32 = _kernel(mp.LinearWeightLayout()(TimeEmbeddingLinearF32), CUDA)
    assert SkinnyMatmul().apply(float32, CUDA, False) is None  # its loads are sized for float16
    assert SkinnyMatmul().apply(float32, tvm.target.Target("webgpu"), False) is not None  # 4 wide there
    narrow = tvm.target.Target({"kind": "webgpu", "max_num_threads": 64})
    assert SkinnyMatmul().apply(linear, narrow, False) is None  # four 32-lane columns do not fit


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_few_row_gemm_on_webgpu_gets_32_lanes_a_column_and_matches_numpy(dtype: str) -> None:
    """WebGPU: 32 invocations a column that read 4-wide vectors; their sums meet in workgroup memory, or
    in subgroup shuffles in a library built for subgroups (compiled here; lavapipe's subgroups are not 32
    wide). The portable kernel, with its bias and SiLU epilogue, on lavapipe (float16) or SwiftShader
    (float32), against numpy in float64: within float16 rounding of the output (or 1e-5)."""
    from webgpu_node import LAVAPIPE, WEBGPU, run_on_webgpu

    from mlcweb.wgsl_check import SWIFTSHADER

    mod = mp.LinearWeightLayout()(TimeEmbeddingLinear if dtype == "float16" else TimeEmbeddingLinearSiLU32)
    func = _kernel(mod, WEBGPU).with_attr("global_symbol", "linear")
    sch = SkinnyMatmul().apply(func, WEBGPU, False)
    assert sch is not None and _launches(sch.mod["main"]) == [640 // 4]
    subgroups = tvm.target.Target({"kind": "webgpu", "supports_subgroups": True, "thread_warp_size": 32})
    sch32 = SkinnyMatmul().apply(func, subgroups, False)
    assert sch32 is not None
    assert "subgroupShuffle" in tvm.compile(sch32.mod, subgroups).mod.imports[0].inspect_source()

    exe = tvm.compile(mod, WEBGPU, relax_pipeline=mp.pipeline(WEBGPU))  # the default rules take it first
    source = exe.mod.imports[0].imports[0].inspect_source()
    assert "@workgroup_size(32, 4, 1)" in source and "subgroup" not in source
    rng = np.random.default_rng(0)
    t = rng.standard_normal((2, 1280)).astype(dtype)
    w = (rng.standard_normal((640, 1280)) / 36).astype(dtype)
    b = rng.standard_normal(640).astype(np.float32)
    got = run_on_webgpu(exe, "main", [t, w, b], icd=LAVAPIPE if dtype == "float16" else SWIFTSHADER)
    h = t.astype(np.float64) @ w.astype(np.float64).T + b
    want = h / (1 + np.exp(-h))
    tolerance = 2**-10 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=0, atol=tolerance * float(np.abs(want).max()))


@I.ir_module
class TimeEmbeddingLinearF32:
    @R.function
    def main(t: R.Tensor((2, 1280), "float32"), w: R.Tensor((640, 1280), "float32")) -> R.Tensor((2, 640), "float32"):
        with R.dataflow():
            out = R.matmul(t, R.permute_dims(w))
            R.output(out)
        return out


@I.ir_module
class TimeEmbeddingLinearSiLU32:
    @R.function
    def main(
        t: R.Tensor((2, 1280), "float32"), w: R.Tensor((640, 1280), "float32"), b: R.Tensor((640,), "float32")
    ) -> R.Tensor((2, 640), "float32"):
        with R.dataflow():
            h = R.add(R.matmul(t, R.permute_dims(w)), b)
            out = R.multiply(h, R.sigmoid(h))
            R.output(out)
        return out


def test_tile_choice_follows_the_shape_and_the_hardware() -> None:
    big = GemmShape(batch=1, m=8192, n=320, k=2880)
    assert choose_tile(big, H100) == TensorCoreTile(2, 2, 4, 4, 4)  # 64x3 blocks of 128x128
    assert choose_tile(big, dataclasses.replace(H100, max_shared_bytes=48 * 1024)) == TensorCoreTile(
        2, 2, 4, 2, 2
    )  # sm_70's limit
    small = GemmShape(batch=1, m=512, n=1280, k=11520)
    assert choose_tile(small, H100) == TensorCoreTile(2, 2, 2, 2, 2)
    assert choose_tile(small, dataclasses.replace(H100, sm_count=40)) == TensorCoreTile(
        2, 2, 4, 4, 4
    )  # 40 blocks fill a small GPU
    with pytest.raises(ValueError, match="does not lower"):
        TensorCoreMatmul(tile=TensorCoreTile(2, 2, 2, 2, 4))


def test_weight_stored_k_by_n_keeps_dlights_tiling() -> None:
    sch = TensorCoreMatmul().apply(_kernel(LinearKN, CUDA), CUDA, False)
    assert sch is not None
    script = sch.mod.script()
    assert "wmma.matrix_b" in script and "software_pipeline_async_stages" not in script


def test_tuning_builds_candidates_with_async_copies_on_sm80() -> None:
    from mlcweb.tune import build_candidate

    sch = TensorCoreMatmul().apply(_kernel(ConvNHWC, CUDA).with_attr("global_symbol", "conv"), CUDA, False)
    assert sch is not None
    preload_tensor_intrinsics()
    assert mp.async_copy_config(CUDA) == ASYNC_COPY_CONFIG
    assert mp.async_copy_config(tvm.target.Target({"kind": "cuda", "arch": "sm_75"})) == {}
    with_async = build_candidate(sch.mod, CUDA, None, config=mp.async_copy_config(CUDA))
    without = build_candidate(sch.mod, CUDA, None)
    assert "cp.async.cg.shared.global" in with_async.imports[0].inspect_source()  # the copies themselves
    assert "cp.async.cg.shared.global" not in without.imports[0].inspect_source()


@I.ir_module
class GroupNormNHWC32:
    """The VAE's 64x64 norm of a float32 webgpu build: channels last, groups of 4 contiguous channels."""

    @R.function
    def main(
        x: R.Tensor((1, 64, 64, 128), "float32"), g: R.Tensor((128,), "float32"), b: R.Tensor((128,), "float32")
    ) -> R.Tensor((1, 64, 64, 128), "float32"):
        with R.dataflow():
            y = R.nn.group_norm(x, g, b, num_groups=32, channel_axis=3, axes=[1, 2])
            out = R.multiply(y, R.sigmoid(y))
            R.output(out)
        return out


def _group_norm_silu(channels: int, size: int) -> tvm.IRModule:
    """A float32 NHWC group norm (32 groups) and SiLU of one ``size`` x ``size`` image of ``channels``."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, size, size, channels), "float32"))
    g, b = (relax.Var(n, relax.TensorType((channels,), "float32")) for n in ("g", "b"))
    with bb.function("main", [x, g, b]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.group_norm(x, g, b, num_groups=32, channel_axis=3, axes=[1, 2]))
            out = bb.emit_output(bb.emit(relax.op.multiply(y, relax.op.sigmoid(y))))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("channels", [128, 960], ids=["vae-128", "unet-960"])
def test_channels_last_group_norm_on_webgpu_matches_pytorch(channels: int) -> None:
    """The same three kernels on WebGPU (Dawn on SwiftShader, float32): PyTorch's group norm and SiLU
    within 1e-5; for the VAE's 128 channels at 64x64, and for the UNet's 960 (its last level's first
    norm), whose 480 two-channel threads exceed WebGPU's 256 a workgroup: each partial-sum workgroup
    takes half the groups, each normalising thread two runs of two channels."""
    import torch
    from webgpu_node import WEBGPU, run_on_webgpu

    mod = GroupNormNHWC32 if channels == 128 else _group_norm_silu(channels, 64)
    func = _kernel(mod, WEBGPU)
    assert ChannelsLastNorm(gpu_facts(WEBGPU)).apply(func, WEBGPU, False) is not None
    exe = tvm.compile(mod, WEBGPU, relax_pipeline=mp.pipeline(WEBGPU))
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((1, 64, 64, channels)) + 1).astype(np.float32)
    g = (1 + 0.1 * rng.standard_normal(channels)).astype(np.float32)
    b = (0.1 * rng.standard_normal(channels)).astype(np.float32)
    got = run_on_webgpu(exe, "main", [x, g, b])
    y = torch.nn.functional.group_norm(
        torch.from_numpy(x).permute(0, 3, 1, 2), 32, torch.from_numpy(g), torch.from_numpy(b)
    )
    want = torch.nn.functional.silu(y).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize(("channels", "runs"), [(640, 2), (960, 2), (320, 1)])
def test_channels_wider_than_a_workgroup_split_into_runs(channels: int, runs: int) -> None:
    """WebGPU workgroups hold 256 threads: SD's 640- and 960-channel levels at 64x64 (320 and 480 pairs of
    channels) took RowReduction's 64 row blocks before. Now the partial sums' grid has a workgroup per
    (image, chunk, half of the groups) and each normalising thread two runs of channels, half the
    channels apart; 320 channels fit one run. CUDA's 1024 threads keep one run."""
    webgpu = tvm.target.Target({"kind": "webgpu"})
    func = _kernel(_group_norm_silu(channels, 64), webgpu).with_attr("global_symbol", "norm")
    sch = ChannelsLastNorm(gpu_facts(webgpu)).apply(func, webgpu, False)
    assert sch is not None
    partials, totals, pixels = _launches(sch.mod["main"])
    assert partials == runs * 128 and totals == 32 and pixels == 64 * 64  # 128 chunks of 32 pixels
    threads = re.findall(r'T\.thread_binding\(T\.int64\((\d+)\), thread="threadIdx\.x"\)', sch.mod["main"].script())
    assert int(threads[0]) == channels // 2 // runs and int(threads[-1]) == channels // 2 // runs
    cuda = ChannelsLastNorm(H100).apply(_kernel(_group_norm_silu(channels, 64), CUDA), CUDA, False)
    assert cuda is not None and _launches(cuda.mod["main"])[0] == 128

"""FlashAttention: the rewrite (checked numerically on the CPU through the reference kernel) and the CUDA
kernel's lowering. The CUDA kernel's numerics are checked on a GPU by benchmarks/flash_attention.py
(every shape against float32 PyTorch) and benchmarks/sd_gpu.py (the UNet against diffusers)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from testutil import DiffusersAttention, as_numpy, build, import_torch, nvcc_ptx, op_names, to_tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp
from mlcweb_passes.cuda.flash_kernel import (
    AttentionShape,
    choose_flash_tile,
    flash_attention_kernel,
    reference_attention_kernel,
    supports_flash_attention,
)

CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})


@I.ir_module
class HeadsAttention:
    """Attention as torch.export and mixed precision leave diffusers' SDPA: head transposes, each side
    scaled by sqrt(1/sqrt(d)), float32 scores, the output transposed back to [B, N, H, D]."""

    @R.function
    def main(
        q: R.Tensor((2, 16, 2, 8), "float16"),
        k: R.Tensor((2, 12, 2, 8), "float16"),
        v: R.Tensor((2, 12, 2, 8), "float16"),
    ) -> R.Tensor((2, 16, 16), "float16"):
        with R.dataflow():
            qh = R.multiply(R.permute_dims(q, axes=[0, 2, 1, 3]), R.astype(R.const(0.59460355, "float32"), "float16"))
            kh = R.permute_dims(R.permute_dims(k, axes=[0, 2, 1, 3]), axes=[0, 1, 3, 2])
            kh = R.multiply(kh, R.astype(R.const(0.59460355, "float32"), "float16"))
            s = R.matmul(R.reshape(qh, [4, 16, 8]), R.reshape(kh, [4, 8, 12]), out_dtype="float32")
            p = R.astype(R.nn.softmax(R.reshape(s, [2, 2, 16, 12]), axis=3), "float16")
            vh = R.reshape(R.permute_dims(v, axes=[0, 2, 1, 3]), [4, 12, 8])
            o = R.astype(R.matmul(R.reshape(p, [4, 16, 12]), vh, out_dtype="float32"), "float16")
            back = R.permute_dims(R.reshape(o, [2, 2, 16, 8]), axes=[0, 2, 1, 3])
            out = R.reshape(back, [2, 16, 16])
            R.output(out)
        return out


def _flash_calls(mod: tvm.IRModule) -> list[str]:
    return [gv.name_hint for gv, f in mod.functions_items() if gv.name_hint.startswith("flash_attention")]


def test_attention_becomes_one_kernel_reading_the_untransposed_inputs() -> None:
    after = mp.FlashAttention(reference_attention_kernel)(HeadsAttention)
    ops = op_names(after)
    assert "relax.nn.softmax" not in ops and "relax.matmul" not in ops and "relax.permute_dims" not in ops
    assert _flash_calls(after) == ["flash_attention"]
    call = next(b.value for b in after["main"].body.blocks[0].bindings if isinstance(b.value, relax.Call))
    assert [p.name for p in call.args[1].fields] == ["q", "k", "v"]  # as stored, [B, N, H, D]
    assert [int(x) for x in call.ty.shape] == [2, 16, 2, 8]


def _inputs(seed: int, q_len: int, kv_len: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, n, 2, 8)).astype(np.float16) for n in (q_len, kv_len, kv_len)]


def test_rewritten_attention_computes_the_same() -> None:
    args = _inputs(0, 16, 12)
    expected = as_numpy(build(HeadsAttention)["main"](*to_tvm(*args)))[0].astype(np.float32)
    after = mp.FlashAttention(reference_attention_kernel)(HeadsAttention)
    got = as_numpy(build(after, flash_attention=False)["main"](*to_tvm(*args)))[0].astype(np.float32)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3)


def test_torch_cross_attention_is_matched_after_mixed_precision_and_matches_pytorch() -> None:
    torch.manual_seed(0)
    model = DiffusersAttention().eval()
    x, context = torch.randn(2, 16, 32), torch.randn(2, 7, 24)
    mod, params = mp.detach_params(import_torch(model, [x, context]))
    mod = mp.DropSoftmaxGuard()(mp.MixedPrecision("float32")(mod))
    after = mp.FlashAttention(reference_attention_kernel)(mod)
    assert _flash_calls(after) == ["flash_attention"]
    assert "relax.nn.softmax" not in op_names(after)
    got = as_numpy(build(after)["main"](*to_tvm(x, context), *params.values()))[0]
    np.testing.assert_allclose(got, model(x, context).detach().numpy(), rtol=0, atol=1e-2)


@I.ir_module
class MaskedAttention:
    @R.function
    def main(
        q: R.Tensor((2, 16, 2, 8), "float16"),
        k: R.Tensor((2, 16, 2, 8), "float16"),
        mask: R.Tensor((16, 16), "float32"),
    ) -> R.Tensor((2, 2, 16, 8), "float32"):
        with R.dataflow():
            qh = R.permute_dims(q, axes=[0, 2, 1, 3])
            kh = R.permute_dims(k, axes=[0, 2, 3, 1])
            s = R.add(R.matmul(qh, kh, out_dtype="float32"), mask)
            p = R.astype(R.nn.softmax(s, axis=-1), "float16")
            out = R.matmul(p, qh, out_dtype="float32")
            R.output(out)
        return out


def test_masked_attention_is_left_alone() -> None:
    after = mp.FlashAttention(reference_attention_kernel)(MaskedAttention)
    assert _flash_calls(after) == [] and "relax.nn.softmax" in op_names(after)


def test_unsupported_shapes_are_refused_with_a_clear_error() -> None:
    assert not AttentionShape(1, 4096, 4096, 1, 512).supported()  # the VAE's single 512-wide head
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention_kernel(AttentionShape(1, 64, 64, 1, 512), 0.1)


def test_cuda_pipeline_compiles_attention_to_one_tensor_core_kernel() -> None:
    assert supports_flash_attention(CUDA)
    assert not supports_flash_attention(tvm.target.Target({"kind": "cuda", "arch": "sm_75"}))
    assert not supports_flash_attention(tvm.target.Target("llvm"))
    with tvm.transform.PassContext(config=mp.async_copy_config(CUDA)):
        exe = tvm.compile(HeadsAttention, CUDA, relax_pipeline=mp.pipeline(CUDA))
    source = exe.mod.imports[0].imports[0].inspect_source()  # VM executable -> host (llvm) -> cuda
    kernels = [line for line in source.splitlines() if line.startswith('extern "C" __global__') and "{" in line]
    # the flash kernel, and a copy of the function's output (it cannot be a view of planned memory)
    assert len(kernels) == 2 and "flash_attention" in kernels[0] and "reshape" in kernels[1]
    assert "mma" in source


def test_tile_rule_takes_large_query_blocks_for_long_self_attention() -> None:
    assert choose_flash_tile(AttentionShape(2, 4096, 4096, 8, 40)) == (8, 128, 2)  # SD's 64x64 level
    assert choose_flash_tile(AttentionShape(2, 1024, 1024, 8, 80)) == (8, 256, 1)  # 32x32: two tiles spill
    assert choose_flash_tile(AttentionShape(2, 4096, 77, 8, 40)) == (4, 64, 1)  # cross-attention
    assert choose_flash_tile(AttentionShape(2, 256, 256, 8, 160)) == (4, 64, 1)  # 16x16: too few blocks
    assert choose_flash_tile(AttentionShape(1, 4096, 4096, 8, 128)) == (4, 64, 1)  # wide heads: not measured
    with pytest.raises(ValueError, match="8 warps cannot copy 64-key tiles"):
        flash_attention_kernel(AttentionShape(2, 64, 64, 2, 40), 0.1, warps=8, block_n=64)


@pytest.mark.parametrize(
    "shape", [AttentionShape(2, 64, 64, 2, 80), AttentionShape(1, 100, 33, 3, 20), AttentionShape(1, 1024, 1024, 1, 40)]
)
def test_kernel_source_compiles_with_nvcc(shape: AttentionShape, tmp_path: Path) -> None:
    """TVM only prints CUDA here (no GPU, no NVRTC); nvcc checks the source is valid CUDA, which TVM's
    printer does not guarantee (a vector copy whose index read a local variable became an invalid gather)."""
    exe = tvm.compile(
        tvm.IRModule({"main": flash_attention_kernel(shape, 0.125).with_attr("global_symbol", "main")}), CUDA
    )
    assert "mma.sync.aligned.m16n8k16" in nvcc_ptx(exe.mod.imports[0].inspect_source(), tmp_path)


@I.ir_module
class ScaledValues:
    """A scale on V multiplies the output, not the scores: not the kernel's computation."""

    @R.function
    def main(
        q: R.Tensor((2, 16, 2, 8), "float16"),
        k: R.Tensor((2, 16, 2, 8), "float16"),
        v: R.Tensor((2, 16, 2, 8), "float16"),
    ) -> R.Tensor((2, 2, 16, 8), "float32"):
        with R.dataflow():
            s = R.matmul(
                R.permute_dims(q, axes=[0, 2, 1, 3]), R.permute_dims(k, axes=[0, 2, 3, 1]), out_dtype="float32"
            )
            p = R.astype(R.nn.softmax(s, axis=-1), "float16")
            vh = R.multiply(R.permute_dims(v, axes=[0, 2, 1, 3]), R.const(2.0, "float16"))
            out = R.matmul(p, vh, out_dtype="float32")
            R.output(out)
        return out


def test_scaled_values_are_left_alone() -> None:
    assert _flash_calls(mp.FlashAttention(reference_attention_kernel)(ScaledValues)) == []


@I.ir_module
class BatchedHeadsAttention:
    """Attention written on [B * H, N, D] tensors (3-D permutes, as torch's bmm attention exports)."""

    @R.function
    def main(
        q: R.Tensor((4, 16, 8), "float16"), k: R.Tensor((4, 16, 8), "float16"), v: R.Tensor((4, 16, 8), "float16")
    ) -> R.Tensor((4, 16, 8), "float32"):
        with R.dataflow():
            s = R.matmul(q, R.permute_dims(k, axes=[0, 2, 1]), out_dtype="float32")
            p = R.astype(R.nn.softmax(s, axis=-1), "float16")
            out = R.matmul(p, v, out_dtype="float32")
            R.output(out)
        return out


def test_attention_without_head_axes_is_left_alone() -> None:
    # the 3-D permute once broke the 4-D axis bookkeeping (IndexError) instead of not matching
    after = mp.FlashAttention(reference_attention_kernel)(BatchedHeadsAttention)
    assert _flash_calls(after) == [] and "relax.nn.softmax" in op_names(after)

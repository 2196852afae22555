"""MergeProjections: attention projections of one input become one GEMM over the concatenated weights and a
split, and FlashAttention reads a self-attention's Q, K and V from that one tensor (``views``)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from testutil import as_numpy, build, import_torch, kernel_launches, nvcc_ptx, op_names, to_tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import mlcweb_passes as mp
from mlcweb_passes._relax import op_name
from mlcweb_passes.cuda.flash_kernel import AttentionShape, flash_attention_kernel, reference_attention_kernel

CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})


@I.ir_module
class Projections:
    """Three projections of the same input as torch.export and LinearWeightLayout leave them (the input
    computed three times), each reshaped to 2 heads of 16."""

    @T.prim_func(private=True, s_tir=True)
    def matmul_nt(
        x: T.Buffer((T.int64(64), T.int64(32)), "float16"),
        w: T.Buffer((T.int64(32), T.int64(32)), "float16"),
        out: T.Buffer((T.int64(64), T.int64(32))),
    ):
        T.func_attr({"tirx.noalias": True})
        for i, n, k in T.grid(T.int64(64), T.int64(32), T.int64(32)):
            with T.sblock("matmul"):
                vi, vn, vk = T.axis.remap("SSR", [i, n, k])
                with T.init():
                    out[vi, vn] = T.float32(0)
                out[vi, vn] = out[vi, vn] + T.Cast("float32", x[vi, vk]) * T.Cast("float32", w[vn, vk])

    @R.function
    def main(
        h: R.Tensor((2, 32, 32), "float32"),
        wq: R.Tensor((32, 32), "float32"),
        wk: R.Tensor((32, 32), "float32"),
        wv: R.Tensor((32, 32), "float32"),
    ) -> R.Tuple(
        R.Tensor((2, 32, 2, 16), "float16"), R.Tensor((2, 32, 2, 16), "float16"), R.Tensor((2, 32, 2, 16), "float16")
    ):
        R.func_attr({"num_input": 1})
        cls = Projections
        with R.dataflow():
            xq = R.astype(R.reshape(h, R.shape([64, 32])), "float16")
            q = R.call_tir(cls.matmul_nt, (xq, R.astype(wq, "float16")), out_ty=R.Tensor((64, 32), "float32"))
            q4 = R.reshape(R.astype(q, "float16"), R.shape([2, 32, 2, 16]))
            xk = R.astype(R.reshape(h, R.shape([64, 32])), "float16")
            k = R.call_tir(cls.matmul_nt, (xk, R.astype(wk, "float16")), out_ty=R.Tensor((64, 32), "float32"))
            k4 = R.reshape(R.astype(k, "float16"), R.shape([2, 32, 2, 16]))
            xv = R.astype(R.reshape(h, R.shape([64, 32])), "float16")
            v = R.call_tir(cls.matmul_nt, (xv, R.astype(wv, "float16")), out_ty=R.Tensor((64, 32), "float32"))
            v4 = R.reshape(R.astype(v, "float16"), R.shape([2, 32, 2, 16]))
            out = (q4, k4, v4)
            R.output(out)
        return out


def _run(mod: tvm.IRModule, *args: np.ndarray) -> list[np.ndarray]:
    return as_numpy(build(mod)["main"](*to_tvm(*args)))


def test_three_projections_become_one_gemm_and_a_split() -> None:
    after = mp.MergeProjections()(Projections)
    ops = op_names(after)
    assert ops.count("relax.call_tir") == 1 and ops.count("relax.concat") == 1 and ops.count("relax.split") == 1
    (gemm,) = [b.value for b in kernel_launches(after)]
    assert [int(d) for d in gemm.args[1].fields[1].ty.shape] == [96, 32]  # [wq; wk; wv]
    (split,) = [b.value for b in after["main"].body.blocks[0].bindings if op_name(b.value) == "relax.split"]
    assert str(split.args[0].ty.dtype) == "float16"  # each part's cast, once, before the split
    rng = np.random.default_rng(0)
    args = [rng.uniform(-1, 1, s).astype("float32") for s in ((2, 32, 32), (32, 32), (32, 32), (32, 32))]
    for got, want in zip(_run(after, *args), _run(Projections, *args), strict=True):
        np.testing.assert_array_equal(got, want)  # the same sums, in one kernel


def test_projections_of_other_inputs_shapes_or_without_heads_stay() -> None:
    two_inputs = tvm.script.from_source(
        Projections.script().replace(
            'lv6: R.Tensor((64, 32), dtype="float32") = R.reshape(h,', "lv6 = R.reshape(R.negative(h),"
        )
    )
    ops = op_names(mp.MergeProjections()(two_inputs))  # K reads another input: Q and V merge, K stays
    assert ops.count("relax.call_tir") == 2 and ops.count("relax.split") == 1
    # heads of 32 x 1: not attention heads for the flash kernel's layout (H must be > 1)
    text = Projections.script().replace("[2, 32, 2, 16]", "[2, 32, 1, 32]").replace("(2, 32, 2, 16)", "(2, 32, 1, 32)")
    one_head = tvm.script.from_source(text)
    assert "relax.split" not in op_names(mp.MergeProjections()(one_head))


def _merged_and_flash(mod: tvm.IRModule) -> tuple[tvm.IRModule, list[relax.Call]]:
    """The pre-lift passes with MergeProjections, then FlashAttention (reference kernel): the module and
    its flash-attention calls."""
    pre = tvm.transform.Sequential([mp.MixedPrecision("float32"), mp.LinearWeightLayout(), mp.MergeProjections()])(mod)
    flash = mp.FlashAttention(reference_attention_kernel)(mp.DropSoftmaxGuard()(pre))
    calls = [b.value for b in kernel_launches(flash) if b.value.args[0].name_hint.startswith("flash_attention")]
    return flash, calls


def test_diffusers_attention_packs_into_one_flash_call_and_matches_pytorch() -> None:
    """diffusers' self-attention through the pre-lift passes and MergeProjections: FlashAttention passes the one
    projection three times (``views`` 0-2 of 3), and the result (reference kernel, CPU) matches PyTorch."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attention = Attention(query_dim=64, heads=2, dim_head=32).eval()
    x = torch.randn(2, 64, 64)
    mod, params = relax.frontend.detach_params(import_torch(attention, (x,)))
    flash, calls = _merged_and_flash(mod)
    assert len(calls) == 1
    packed = calls[0].args[1].fields
    assert all(a.same_as(packed[0]) for a in packed) and [int(d) for d in packed[0].ty.shape] == [2, 64, 3, 2, 32]
    assert "relax.split" not in op_names(flash)  # nothing copies the three parts out
    (got,) = _run(flash, x.numpy(), *[p.numpy() for p in params["main"]])
    with torch.no_grad():
        want = attention(x).numpy()
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3)


def test_cross_attentions_read_their_keys_and_values_in_place_and_match_pytorch() -> None:
    """Two cross-attentions of one text embedding: their four K/V projections become one GEMM, and each
    flash call reads its K and V as parts 0-1 / 2-3 of it (no split); the result matches PyTorch."""
    from diffusers.models.attention_processor import Attention

    class TwoCross(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = Attention(query_dim=64, cross_attention_dim=32, heads=2, dim_head=32)
            self.b = Attention(query_dim=64, cross_attention_dim=32, heads=2, dim_head=32)

        def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x, text), text)

    torch.manual_seed(0)
    model = TwoCross().eval()
    x, text = torch.randn(2, 64, 64), torch.randn(2, 7, 32)
    mod, params = relax.frontend.detach_params(import_torch(model, (x, text)))
    flash, calls = _merged_and_flash(mod)
    assert len(calls) == 2 and "relax.split" not in op_names(flash)
    for call in calls:
        _, k, v = call.args[1].fields
        assert k.same_as(v) and [int(d) for d in k.ty.shape] == [2, 7, 4, 2, 32]  # the four projections
    (got,) = _run(flash, x.numpy(), text.numpy(), *[p.numpy() for p in params["main"]])
    with torch.no_grad():
        want = model(x, text).numpy()
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3)


def test_kernels_reading_parts_compile_with_nvcc(tmp_path: Path) -> None:
    self_attention = flash_attention_kernel(AttentionShape(2, 1024, 1024, 8, 40), 0.125, views=((3, 0), (3, 1), (3, 2)))
    cross = flash_attention_kernel(AttentionShape(2, 1024, 77, 8, 40), 0.125, views=(None, (10, 4), (10, 5)))
    for i, func in enumerate((self_attention, cross)):
        exe = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), CUDA)
        (tmp_path / str(i)).mkdir()
        assert "mma.sync.aligned.m16n8k16" in nvcc_ptx(exe.mod.imports[0].inspect_source(), tmp_path / str(i))
    with pytest.raises(ValueError, match="index < count"):
        flash_attention_kernel(AttentionShape(2, 64, 77, 8, 40), 0.125, views=((3, 3), None, None))

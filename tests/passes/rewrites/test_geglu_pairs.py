"""GegluPairs: ``a * gelu(g)`` of a projection's halves becomes one GEMM over interleaved weight rows whose
epilogue combines neighbouring columns, and WgmmaGemm plans that epilogue."""

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from testutil import H100, as_numpy, build, import_torch, kernel_launches, op_names, to_tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import mlcweb_passes as mp
from mlcweb_passes.cuda import wgmma_plan
from mlcweb_passes.rewrites.geglu_pairs import interleave_halves


@I.ir_module
class Geglu:
    """A GEGLU as torch.export, MixedPrecision("float32") and LinearWeightLayout leave diffusers' one: the
    projection, a float16 round trip, the bias, a reshape, the split, gelu and the product."""

    @T.prim_func(private=True, s_tir=True)
    def matmul_nt(
        x: T.Buffer((T.int64(128), T.int64(64)), "float16"),
        w: T.Buffer((T.int64(256), T.int64(64)), "float16"),
        out: T.Buffer((T.int64(128), T.int64(256))),
    ):
        T.func_attr({"tirx.noalias": True})
        for i, n, k in T.grid(T.int64(128), T.int64(256), T.int64(64)):
            with T.sblock("matmul"):
                vi, vn, vk = T.axis.remap("SSR", [i, n, k])
                with T.init():
                    out[vi, vn] = T.float32(0)
                out[vi, vn] = out[vi, vn] + T.Cast("float32", x[vi, vk]) * T.Cast("float32", w[vn, vk])

    @R.function
    def main(
        x: R.Tensor((128, 64), "float16"), w: R.Tensor((256, 64), "float32"), b: R.Tensor((256,), "float32")
    ) -> R.Tensor((2, 64, 128), "float32"):
        R.func_attr({"num_input": 1})
        cls = Geglu
        with R.dataflow():
            w16 = R.astype(w, "float16")
            h = R.call_tir(cls.matmul_nt, (x, w16), out_ty=R.Tensor((128, 256), "float32"))
            h16 = R.astype(h, "float16")
            h32 = R.astype(h16, "float32")
            biased = R.add(b, h32)
            r = R.reshape(R.astype(biased, "float16"), R.shape([2, 64, 256]))
            halves = R.split(R.astype(r, "float32"), indices_or_sections=[128], axis=2)
            out = R.multiply(halves[0], R.nn.gelu(halves[1]))
            R.output(out)
        return out


def _run(mod: tvm.IRModule, *args: np.ndarray) -> np.ndarray:
    (out,) = as_numpy(build(mod)["main"](*to_tvm(*args)))
    return out


def test_geglu_becomes_one_call_over_interleaved_weights() -> None:
    after = mp.GegluPairs()(Geglu)
    ops = op_names(after)
    # before: astype, call_tir, astype, astype, add, astype, reshape, astype, split, gelu, multiply
    assert "relax.split" not in ops and "relax.nn.gelu" not in ops
    assert [b.value.args[0].name_hint for b in kernel_launches(after)] == ["matmul_nt_geglu"]
    # the weight's rows and the bias interleaved by Relax ops on the parameters, which lifting folds
    assert ops.count("relax.permute_dims") == 2
    assert ops[-1] == "relax.reshape"  # back to the product's [2, 64, 128]


def test_rewritten_geglu_computes_the_same() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (128, 64)).astype("float16")
    w = rng.uniform(-0.3, 0.3, (256, 64)).astype("float32")
    b = rng.uniform(-1, 1, (256,)).astype("float32")
    want = _run(Geglu, x, w, b)
    got = _run(mp.GegluPairs()(Geglu), x, w, b)
    np.testing.assert_array_equal(got, want)  # the same operations on the same values


def test_interleave_halves() -> None:
    x = relax.Var("x", relax.TensorType((4, 3), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(interleave_halves(x, 0)))
    a = np.arange(12, dtype="float32").reshape(4, 3)
    got = relax.VirtualMachine(tvm.compile(bb.get(), "llvm"), tvm.cpu())["main"](tvm.runtime.tensor(a)).numpy()
    np.testing.assert_array_equal(got, a[[0, 2, 1, 3]])
    with pytest.raises(ValueError, match="cannot interleave"):
        interleave_halves(relax.Var("y", relax.TensorType((3, 2), "float32")), 0)


@I.ir_module
class SharedHalf:
    """The value half has a second use: its columns must keep their order, so the GEGLU stays."""

    @R.function
    def main(h: R.Tensor((4, 8), "float32")) -> R.Tuple(R.Tensor((4, 4), "float32"), R.Tensor((4, 4), "float32")):
        with R.dataflow():
            halves = R.split(h, indices_or_sections=2, axis=1)
            a = halves[0]
            out = R.multiply(a, R.nn.gelu(halves[1]))
            both = (out, a)
            R.output(both)
        return both


def test_geglu_with_a_shared_half_or_without_matmul_nt_is_left_alone() -> None:
    assert tvm_ffi.structural_equal(mp.GegluPairs()(SharedHalf), SharedHalf)
    # the same chain over a kernel that is not LinearWeightLayout's: its columns' origin is unknown
    other = tvm.script.from_source(Geglu.script().replace("matmul_nt", "other_matmul"))
    assert "relax.split" in op_names(mp.GegluPairs()(other))


def test_diffusers_geglu_matches_pytorch_and_becomes_a_pair_epilogue() -> None:
    """diffusers' FeedForward (GEGLU) through torch.export, the pre-lift passes and fusion: one fused GEMM
    that WgmmaGemm plans with a column-pair epilogue; the result on the CPU equals PyTorch's."""
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(64, mult=4, activation_fn="geglu").eval()
    x = torch.randn(2, 64, 64)
    mod, params = relax.frontend.detach_params(import_torch(ff, (x,)))
    pre = tvm.transform.Sequential([mp.MixedPrecision("float32"), mp.LinearWeightLayout(), mp.GegluPairs()])(mod)
    assert any("geglu" in gv.name_hint for gv in pre.get_global_vars())
    got = _run(pre, x.numpy(), *[p.numpy() for p in params["main"]])
    with torch.no_grad():
        want = ff(x.half().float()).numpy()  # MixedPrecision: float16 GEMM inputs, float32 sums
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)

    fused = mp.FuseOperators()(mp.HoistNarrowingCasts()(pre))
    geglu = [f for gv, f in fused.functions_items() if "geglu" in gv.name_hint]
    assert len(geglu) == 1
    kernel = wgmma_plan.plan_kernel(geglu[0], "k", H100.sm_count)
    assert kernel.column_pairs and (kernel.m, kernel.n, kernel.k) == (128, 512, 64)


def test_default_rules_schedule_the_pair_epilogue_when_wgmma_is_off() -> None:
    """dlight's Matmul rule asserts on the column-pair epilogue; DefaultSchedule then tries the next rule
    instead of failing the build (a CUDA build with ``wgmma=False``, or a GPU without wgmma)."""
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90", "max_num_threads": 1024, "thread_warp_size": 32})
    fused = mp.FuseOperators()(mp.HoistNarrowingCasts()(mp.GegluPairs()(Geglu)))
    (name,) = [gv.name_hint for gv in fused.get_global_vars() if "geglu" in gv.name_hint]
    with target:
        scheduled = mp.DefaultSchedule(target)(fused)
    assert mp.is_scheduled(scheduled[name])

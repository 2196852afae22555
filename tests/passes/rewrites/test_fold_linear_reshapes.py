"""FoldLinearReshapes: a feed-forward's output linear multiplies the tokens in their own shape, so its
residual add becomes the GEMM's epilogue instead of a kernel of its own."""

import numpy as np
import torch
import tvm
import tvm_ffi
from testutil import as_numpy, build, import_torch, op_names, to_tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp


class FeedForwardBlock(torch.nn.Module):
    """diffusers' feed-forward with its residual, as a transformer block runs it: ``x + ff(x)``."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        from diffusers.models.attention import FeedForward

        self.ff = FeedForward(dim, mult=2, activation_fn="geglu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x) + x


@I.ir_module
class Shared:
    """The flattened GEMM's result also goes elsewhere: folding would compute it twice."""

    @R.function
    def main(x: R.Tensor((2, 8, 16), "float32"), w: R.Tensor((16, 16), "float32")) -> R.Tuple(
        R.Tensor((2, 8, 16), "float32"), R.Tensor((16, 16), "float32")
    ):
        with R.dataflow():
            flat = R.reshape(x, R.shape([16, 16]))
            y = R.matmul(flat, w)
            back = R.reshape(y, R.shape([2, 8, 16]))
            out = (R.add(back, x), y)
            R.output(out)
        return out


@I.ir_module
class Plain:
    """A matmul with no output dtype, its bias second, the residual first: still folded."""

    @R.function
    def main(
        x: R.Tensor((2, 8, 16), "float32"), w: R.Tensor((16, 16), "float32"), b: R.Tensor((16,), "float32")
    ) -> R.Tensor((2, 8, 16), "float32"):
        with R.dataflow():
            flat = R.reshape(x, R.shape([16, 16]))
            y = R.matmul(flat, w)
            z = R.add(y, b)
            back = R.reshape(z, R.shape([2, 8, 16]))
            out = R.add(x, back)
            R.output(out)
        return out


def _imported() -> tuple[torch.nn.Module, torch.Tensor, tvm.IRModule, list[np.ndarray]]:
    torch.manual_seed(0)
    block = FeedForwardBlock().eval()
    x = torch.randn(2, 24, 32)
    mod, params = mp.detach_params(import_torch(block, (x,)))
    return block, x, mod, [p.numpy() for p in params.values()]


def test_the_output_linear_keeps_the_tokens_shape_and_the_result_is_unchanged() -> None:
    block, x, mod, params = _imported()
    after = mp.FoldLinearReshapes()(mod)
    # the GEGLU projection (a split follows it, no residual) keeps its reshapes; the output linear's go
    assert op_names(mod).count("relax.reshape") - op_names(after).count("relax.reshape") == 2
    got = as_numpy(build(after)["main"](*to_tvm(x.numpy(), *params)))[0]
    with torch.no_grad():
        want = block(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got, as_numpy(build(mod)["main"](*to_tvm(x.numpy(), *params)))[0])


def test_the_residual_add_is_the_gemms_epilogue() -> None:
    """After the whole webgpu float16 pipeline's fusion, the output linear's kernel adds the residual: no
    kernel is left that only reshapes, casts and adds."""
    _, _, mod, _ = _imported()
    target = tvm.target.Target({"kind": "webgpu"})
    with target:
        fused = mp.pipeline(target, mp.PipelineOptions(dtype="float16"), until="fuse")(mod)
    names = [gv.name_hint for gv in fused.get_global_vars()]
    gemms = [n for n in names if n.startswith("fused_matmul_nt") and n.count("add") == 2]
    assert gemms, names  # bias and residual
    assert not [n for n in names if "reshape" in n and "add" in n and "matmul" not in n], names


def test_a_gemm_with_another_use_is_left() -> None:
    assert tvm_ffi.structural_equal(mp.FoldLinearReshapes()(Shared), Shared)


def test_any_operand_order_and_a_matmul_without_an_output_dtype_fold() -> None:
    after = mp.FoldLinearReshapes()(Plain)
    assert op_names(after) == ["relax.matmul", "relax.add", "relax.add"]
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(shape).astype(np.float32) for shape in ((2, 8, 16), (16, 16), (16,)))
    got = as_numpy(build(after)["main"](*to_tvm(x, w, b)))[0]
    np.testing.assert_array_equal(got, as_numpy(build(Plain)["main"](*to_tvm(x, w, b)))[0])

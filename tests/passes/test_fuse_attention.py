import numpy as np
import torch
from testutil import as_numpy, build, composite_names, import_torch, to_tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp


@I.ir_module
class Attention:
    @R.function
    def main(
        q: R.Tensor((2, 16, 8), "float32"),
        k: R.Tensor((2, 16, 8), "float32"),
        v: R.Tensor((2, 16, 8), "float32"),
    ) -> R.Tensor((2, 16, 8), "float32"):
        with R.dataflow():
            kt = R.permute_dims(k, axes=[0, 2, 1])
            s = R.matmul(q, kt)
            scaled = R.multiply(s, R.const(0.35355339, "float32"))
            p = R.nn.softmax(scaled, axis=-1)
            out = R.matmul(p, v)
            R.output(out)
        return out


def _reference(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def test_attention_becomes_one_composite_and_one_kernel() -> None:
    assert composite_names(Attention) == []
    fused = mp.FuseAttention()(Attention)
    assert composite_names(fused) == [mp.ATTENTION_COMPOSITE]
    plain_kernels = mp.count_kernels(mp.FuseOperators()(Attention))
    attn_kernels = mp.count_kernels(mp.FuseOperators()(fused))
    # before: transpose, scores matmul (+scale), softmax, weighted sum; after: transpose + attention
    assert plain_kernels >= 4
    assert attn_kernels == 2


def test_fused_attention_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 16, 8), dtype=np.float32) for _ in range(3))
    got = as_numpy(build(Attention, fuse_attention=True)["main"](*to_tvm(q, k, v)))[0]
    np.testing.assert_allclose(got, _reference(q, k, v), rtol=1e-5, atol=1e-5)


class SelfAttention(torch.nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention, as diffusers writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)
        self.out = torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 4, 8).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, s, 32))


def test_torch_sdpa_is_fused_and_matches_pytorch() -> None:
    torch.manual_seed(0)
    model = SelfAttention().eval()
    x = torch.randn(2, 16, 32)
    mod, params = mp.detach_params(import_torch(model, [x]))
    assert composite_names(mp.FuseAttention()(mod)) == [mp.ATTENTION_COMPOSITE]
    got = as_numpy(build(mod)["main"](*to_tvm(x), *params.values()))[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)

import numpy as np
import torch
from testutil import as_numpy, build, import_torch, op_names, to_tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp

GUARD_OPS = {"relax.equal", "relax.logical_not", "relax.max", "relax.where", "relax.full_like"}


@I.ir_module
class Guarded:
    """torch SDPA's math decomposition, as exported: softmax, then zero rows that were all -inf."""

    @R.function
    def main(
        q: R.Tensor((2, 8, 4), "float32"), k: R.Tensor((2, 4, 8), "float32"), mask: R.Tensor((2, 8, 8), "float32")
    ) -> R.Tuple(R.Tensor((2, 8, 8), "float32"), R.Tensor((2, 8, 8), "float32")):
        with R.dataflow():
            s = R.multiply(R.matmul(q, k), R.const(0.5, "float32"))
            unmasked = R.nn.softmax(s, axis=-1)
            keep = R.logical_not(R.equal(s, R.const(float("-inf"), "float32")))
            dead = R.logical_not(R.astype(R.max(R.astype(keep, "int8"), axis=[-1], keepdims=True), "bool"))
            a = R.where(dead, R.full_like(unmasked, R.const(0.0, "float32")), unmasked)
            # the same guard behind an additive mask: rows may be all -inf, so it must stay
            m = R.add(s, mask)
            masked = R.nn.softmax(m, axis=-1)
            keep2 = R.logical_not(R.equal(m, R.const(float("-inf"), "float32")))
            dead2 = R.logical_not(R.astype(R.max(R.astype(keep2, "int8"), axis=[-1], keepdims=True), "bool"))
            b = R.where(dead2, R.full_like(masked, R.const(0.0, "float32")), masked)
            out = (a, b)
            R.output(out)
        return out


def test_guard_goes_where_scores_are_a_scaled_matmul_and_stays_behind_a_mask() -> None:
    before = op_names(Guarded)
    after = op_names(mp.DropSoftmaxGuard()(Guarded))
    assert before.count("relax.where") == 2
    assert after.count("relax.where") == 1  # the masked one
    assert after.count("relax.nn.softmax") == 2
    assert sum(op in GUARD_OPS for op in after) == sum(op in GUARD_OPS for op in before) // 2


def test_results_are_unchanged_including_fully_masked_rows() -> None:
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 8, 4), dtype=np.float32), rng.standard_normal((2, 4, 8), dtype=np.float32)
    mask = np.zeros((2, 8, 8), np.float32)
    mask[0, 3, :] = -np.inf  # one row masked out entirely: the kept guard must still zero it
    want = as_numpy(build(Guarded)["main"](*to_tvm(q, k, mask)))
    got = as_numpy(build(mp.DropSoftmaxGuard()(Guarded))["main"](*to_tvm(q, k, mask)))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert (got[1][0, 3] == 0).all()


def test_torch_sdpa_without_mask_loses_its_guard_and_matches_torch() -> None:
    class SDPA(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    mod = import_torch(SDPA(), [q, k, v])
    assert "relax.where" in op_names(mod)
    dropped = mp.DropSoftmaxGuard()(mod)
    assert "relax.where" not in op_names(dropped)
    got = as_numpy(build(dropped)["main"](*to_tvm(q, k, v)))[0]
    np.testing.assert_allclose(got, SDPA()(q, k, v).numpy(), rtol=1e-5, atol=1e-5)

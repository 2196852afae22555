import numpy as np
from testutil import as_numpy, build, op_names, to_tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp


@I.ir_module
class Linear:
    """``nn.Linear`` as torch.export and mixed precision leave it: a transposed, cast weight parameter."""

    @R.function
    def main(
        x: R.Tensor((2, 8, 32), "float16"), w: R.Tensor((48, 32), "float32"), bias: R.Tensor((48,), "float32")
    ) -> R.Tensor((2, 8, 48), "float32"):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            wt = R.astype(R.permute_dims(w, axes=[1, 0]), "float16")
            y = R.add(R.matmul(x, wt, out_dtype="float32"), bias)
            R.output(y)
        return y


def test_linear_reads_its_weight_as_stored() -> None:
    after = mp.LinearWeightLayout()(Linear)
    assert "relax.matmul" not in op_names(after) and "relax.permute_dims" not in op_names(after)
    assert "matmul_nt" in after.script()
    lifted = mp.split_transform_params(after)
    shapes = [[int(d) for d in p.ty.shape] for p in lifted.deploy["main"].params[1:]]
    assert [48, 32] in shapes and [32, 48] not in shapes  # stored [out, in], cast to float16 by the lift


def test_rewritten_linear_computes_the_same() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 32)).astype(np.float16)
    w = rng.standard_normal((48, 32)).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    expected = as_numpy(build(Linear)["main"](*to_tvm(x, w, b)))[0]
    got = as_numpy(build(mp.LinearWeightLayout()(Linear))["main"](*to_tvm(x, w, b)))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


@I.ir_module
class ActivationMatmul:
    @R.function
    def main(q: R.Tensor((4, 16, 8), "float32"), k: R.Tensor((4, 16, 8), "float32")) -> R.Tensor(
        (4, 16, 16), "float32"
    ):
        with R.dataflow():
            s = R.matmul(q, R.permute_dims(k, axes=[0, 2, 1]))
            R.output(s)
        return s


def test_matmuls_of_activations_are_left_alone() -> None:
    after = mp.LinearWeightLayout()(ActivationMatmul)
    assert "relax.matmul" in op_names(after)


@I.ir_module
class BatchedLinear:
    """A linear on a non-contiguous 3-D input, as torch.export gives it: a batched matmul with the
    transposed weight broadcast over the batch (diffusers' attention output projection)."""

    @R.function
    def main(x: R.Tensor((2, 8, 32), "float16"), w: R.Tensor((48, 32), "float32")) -> R.Tensor((2, 8, 48), "float32"):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            wt = R.astype(R.broadcast_to(R.permute_dims(w, axes=[1, 0]), R.shape([2, 32, 48])), "float16")
            y = R.matmul(x, wt, out_dtype="float32")
            R.output(y)
        return y


def test_batched_linear_reads_one_weight_as_stored() -> None:
    after = mp.LinearWeightLayout()(BatchedLinear)
    assert "relax.matmul" not in op_names(after) and "relax.broadcast_to" not in op_names(after)
    lifted = mp.split_transform_params(after)
    shapes = [[int(d) for d in p.ty.shape] for p in lifted.deploy["main"].params[1:]]
    assert shapes == [[48, 32]]  # one [out, in] copy, not one per batch item
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 32)).astype(np.float16)
    w = rng.standard_normal((48, 32)).astype(np.float32)
    expected = as_numpy(build(BatchedLinear)["main"](*to_tvm(x, w)))[0]
    got = as_numpy(build(after)["main"](*to_tvm(x, w)))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)

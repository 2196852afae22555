import numpy as np
import pytest
import tvm
from testutil import as_numpy, build, function_names, op_names, to_tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp


@I.ir_module
class Linear:
    @R.function
    def main(
        x: R.Tensor((4, 8), "float32"), w: R.Tensor((16, 8), "float32"), b: R.Tensor((16,), "float32")
    ) -> R.Tensor((4, 16), "float32"):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            wt = R.permute_dims(w, axes=[1, 0])
            y = R.matmul(x, wt)
            out = R.add(y, b)
            R.output(out)
        return out


def test_split_moves_weight_only_work_into_the_transform_module() -> None:
    assert "relax.permute_dims" in op_names(Linear)  # before: transposed on every call
    lifted = mp.split_transform_params(Linear)
    assert function_names(lifted.transform) == ["main_transform_params"]
    assert function_names(lifted.deploy) == ["main"]
    assert "relax.permute_dims" not in op_names(lifted.deploy)
    assert "relax.permute_dims" in op_names(lifted.transform, "main_transform_params")
    deploy_args = lifted.deploy["main"].params
    assert len(deploy_args) == 3
    shapes = sorted(tuple(int(d) for d in arg.ty.shape) for arg in deploy_args[1:])
    assert shapes == [(8, 16), (16,)]  # the weight arrives already transposed


def test_transformed_params_reproduce_the_original_outputs() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8), dtype=np.float32)
    w = rng.standard_normal((16, 8), dtype=np.float32)
    b = rng.standard_normal(16, dtype=np.float32)
    expected = as_numpy(build(Linear)["main"](*to_tvm(x, w, b)))[0]
    np.testing.assert_allclose(expected, x @ w.T + b, rtol=1e-5, atol=1e-5)

    lifted = mp.split_transform_params(Linear)
    deploy_params = mp.apply_transform_params(lifted.transform, to_tvm(w, b))
    got = as_numpy(build(lifted.deploy)["main"](*to_tvm(x), *deploy_params))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_module_without_num_input_is_refused() -> None:
    @I.ir_module
    class NoWeights:
        @R.function
        def main(x: R.Tensor((2,), "float32")) -> R.Tensor((2,), "float32"):
            return R.add(x, x)

    with pytest.raises(ValueError, match="keep_params_as_input"):
        mp.split_transform_params(NoWeights)


def test_split_keeps_deploy_and_transform_disjoint() -> None:
    lifted = mp.split_transform_params(Linear)
    assert not set(function_names(lifted.transform)) & set(function_names(lifted.deploy))
    assert isinstance(lifted.deploy, tvm.IRModule)


def test_a_compiled_transform_can_be_reused() -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 8), dtype=np.float32)
    b = rng.standard_normal(16, dtype=np.float32)
    lifted = mp.split_transform_params(Linear)
    vm = mp.compile_transform(lifted.transform)
    from_vm = mp.apply_transform_params(vm, to_tvm(w, b))
    from_module = mp.apply_transform_params(lifted.transform, to_tvm(w, b))
    assert len(from_vm) == len(from_module) == 2
    for a, c in zip(from_vm, from_module, strict=True):
        np.testing.assert_array_equal(a.numpy(), c.numpy())

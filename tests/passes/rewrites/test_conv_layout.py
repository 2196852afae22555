import numpy as np
import pytest
from testutil import as_numpy, build, op_names, to_tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp


@I.ir_module
class ConvNormConv:
    """A ResNet block's start as torch.export imports it: NCHW convolutions, a group norm between, and a
    weight parameter after the one input (``num_input`` 1)."""

    @R.function
    def main(
        x: R.Tensor((1, 8, 6, 6), "float32"),
        w1: R.Tensor((16, 8, 3, 3), "float32"),
        gamma: R.Tensor((16,), "float32"),
        beta: R.Tensor((16,), "float32"),
        w2: R.Tensor((16, 16, 1, 1), "float32"),
    ) -> R.Tensor((1, 16, 6, 6), "float32"):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            h = R.nn.conv2d(x, w1, padding=[1, 1, 1, 1])
            n = R.nn.group_norm(h, gamma, beta, num_groups=4, channel_axis=1, axes=[2, 3])
            y = R.nn.conv2d(R.nn.silu(n), w2)
            out = R.add(y, h)
            R.output(out)
        return out


def test_convolutions_become_nhwc_and_the_layout_flows_between_them() -> None:
    after = mp.ConvLayout()(ConvNormConv)
    convs = [line for line in after.script().splitlines() if "R.nn.conv2d" in line]
    assert len(convs) == 2 and all('data_layout="NHWC", kernel_layout="OHWI"' in c for c in convs)
    assert "channel_axis=3" in after.script()  # the group norm follows the layout
    ops = op_names(after)
    # input to NHWC, two kernels to OHWI, output back to NCHW; nothing between the convolutions
    assert ops.count("relax.permute_dims") == 4
    assert [int(d) for d in after["main"].ret_ty.shape] == [1, 16, 6, 6]  # the signature keeps NCHW


def test_kernel_transposes_are_lifted_with_the_weights() -> None:
    lifted = mp.split_transform_params(mp.ConvLayout()(ConvNormConv))
    assert op_names(lifted.deploy).count("relax.permute_dims") == 2  # only the activation's way in and out
    weights = [[int(d) for d in p.ty.shape] for p in lifted.deploy["main"].params[1:]]
    assert [16, 3, 3, 8] in weights and [16, 8, 3, 3] not in weights  # w1 stored OHWI


def test_nhwc_module_computes_the_same() -> None:
    rng = np.random.default_rng(0)
    shapes = [[int(d) for d in p.ty.shape] for p in ConvNormConv["main"].params]
    args = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    expected = as_numpy(build(ConvNormConv)["main"](*to_tvm(*args)))[0]
    got = as_numpy(build(mp.ConvLayout()(ConvNormConv))["main"](*to_tvm(*args)))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_bad_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="permutations of NCHW"):
        mp.ConvLayout("NHWD")

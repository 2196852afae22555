"""FoldPadIntoConv: the VAE encoder's asymmetric zero pad before a stride-2 convolution becomes the
convolution's own padding (one kernel fewer; no pad epilogue fused onto the previous convolution)."""

import numpy as np
import pytest
import tvm
from testutil import as_numpy, build, op_names, to_tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp


@I.ir_module
class Downsample:
    @R.function
    def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((6, 4, 3, 3), "float32")):
        with R.dataflow():
            padded = R.nn.pad(x, pad_width=[0, 0, 0, 0, 0, 1, 0, 1], pad_value=0.0)
            y = R.nn.conv2d(padded, w, strides=[2, 2], padding=[0, 0, 0, 0])
            R.output(y)
        return y


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((6, 4, 3, 3), "float32")):
        with R.dataflow():
            y = R.nn.conv2d(x, w, strides=[2, 2], padding=[0, 0, 1, 1])
            R.output(y)
        return y


def test_the_pad_becomes_padding() -> None:
    assert op_names(Downsample) == ["relax.nn.pad", "relax.nn.conv2d"]
    after = mp.FoldPadIntoConv()(Downsample)
    tvm.ir.assert_structural_equal(after, Expected)


def test_same_numbers() -> None:
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 4, 8, 8)).astype("float32"), rng.standard_normal((6, 4, 3, 3)).astype("float32")
    before = as_numpy(build(Downsample)["main"](*to_tvm(x, w)))[0]
    after = as_numpy(build(mp.FoldPadIntoConv()(Downsample))["main"](*to_tvm(x, w)))[0]
    assert before.shape == (1, 6, 4, 4)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


@I.ir_module
class CastBetween:
    # a float16 build: MixedPrecision casts the padded tensor for the convolution
    @R.function
    def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((6, 4, 3, 3), "float16")):
        with R.dataflow():
            padded = R.nn.pad(x, pad_width=[0, 0, 0, 0, 0, 1, 0, 1], pad_value=0.0)
            half = R.astype(padded, "float16")
            y = R.nn.conv2d(half, w, strides=[2, 2], padding=[0, 0, 0, 0], out_dtype="float32")
            R.output(y)
        return y


def test_the_pad_folds_through_a_cast() -> None:
    after = mp.FoldPadIntoConv()(CastBetween)
    assert op_names(after) == ["relax.astype", "relax.nn.conv2d"]
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((1, 4, 8, 8)).astype("float32"), rng.standard_normal((6, 4, 3, 3)).astype("float16")
    before = as_numpy(build(CastBetween)["main"](*to_tvm(x, w)))[0]
    np.testing.assert_allclose(as_numpy(build(after)["main"](*to_tvm(x, w)))[0], before, rtol=1e-3, atol=1e-3)


@I.ir_module
class ChannelPad:
    @R.function
    def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((6, 5, 3, 3), "float32")):
        with R.dataflow():
            padded = R.nn.pad(x, pad_width=[0, 0, 1, 0, 0, 1, 0, 1], pad_value=0.0)
            y = R.nn.conv2d(padded, w)
            R.output(y)
        return y


@I.ir_module
class OnesPad:
    @R.function
    def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((6, 4, 3, 3), "float32")):
        with R.dataflow():
            padded = R.nn.pad(x, pad_width=[0, 0, 0, 0, 0, 1, 0, 1], pad_value=1.0)
            y = R.nn.conv2d(padded, w)
            R.output(y)
        return y


@pytest.mark.parametrize("mod", [ChannelPad, OnesPad], ids=["channel-pad", "non-zero-value"])
def test_other_pads_stay(mod: tvm.IRModule) -> None:
    assert "relax.nn.pad" in op_names(mp.FoldPadIntoConv()(mod))

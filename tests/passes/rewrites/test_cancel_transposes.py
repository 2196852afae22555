"""CancelTransposes: NHWC -> NCHW -> NHWC with casts between (a transformer block's residual before its
proj_out, as ConvLayout leaves it) becomes the casts alone, or nothing."""

import numpy as np
from testutil import as_numpy, build, op_names, to_tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp


@I.ir_module
class Residual:
    @R.function
    def main(
        h: R.Tensor((2, 4, 4, 8), "float16"), r: R.Tensor((2, 4, 4, 8), "float16"), w: R.Tensor((8, 1, 1, 8), "float16")
    ) -> R.Tensor((2, 4, 4, 8), "float32"):
        with R.dataflow():
            wide = R.astype(h, "float32")
            nchw = R.permute_dims(wide, axes=[0, 3, 1, 2])
            narrow = R.astype(nchw, "float16")
            nhwc = R.permute_dims(narrow, axes=[0, 2, 3, 1])
            summed = R.add(nhwc, r)
            out = R.nn.conv2d(summed, w, data_layout="NHWC", kernel_layout="OHWI", out_dtype="float32")
            R.output(out)
        return out


@I.ir_module
class Kept:
    @R.function
    def main(
        x: R.Tensor((2, 3, 4), "float32"),
    ) -> R.Tuple(R.Tensor((2, 3, 4), "float16"), R.Tensor((4, 2, 3), "float32")):
        with R.dataflow():
            t = R.permute_dims(x, axes=[2, 0, 1])  # also an output: stays
            back = R.permute_dims(R.astype(t, "float16"), axes=[1, 2, 0])  # undoes it: the cast of x
            other = R.permute_dims(t, axes=[0, 2, 1])  # does not undo it: stays
            out = (back, R.permute_dims(other, axes=[2, 1, 0]))
            R.output(out)
        return out


def test_the_pair_and_the_round_trip_cast_go() -> None:
    assert op_names(Residual).count("relax.permute_dims") == 2
    assert op_names(mp.CancelTransposes()(Residual)) == ["relax.add", "relax.nn.conv2d"]


def test_a_pair_that_does_not_cancel_stays_and_the_outputs_are_unchanged() -> None:
    after = mp.CancelTransposes()(Kept)
    assert op_names(after).count("relax.permute_dims") == 3  # t, other and its own transpose
    assert op_names(after).count("relax.astype") == 1  # on x
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    for mod in (Kept, after):
        back, last = as_numpy(build(mod)["main"](*to_tvm(x)))
        np.testing.assert_array_equal(back, x.astype(np.float16))
        np.testing.assert_array_equal(last, x.transpose(2, 0, 1).transpose(0, 2, 1).transpose(2, 1, 0))


def test_the_residual_is_unchanged() -> None:
    rng = np.random.default_rng(0)
    h, r = (rng.standard_normal((2, 4, 4, 8)).astype(np.float16) for _ in range(2))
    w = (rng.standard_normal((8, 1, 1, 8)) / 3).astype(np.float16)
    want = as_numpy(build(Residual)["main"](*to_tvm(h, r, w)))
    got = as_numpy(build(mp.CancelTransposes()(Residual))["main"](*to_tvm(h, r, w)))
    np.testing.assert_array_equal(got, want)

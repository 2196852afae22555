"""FoldBoolIdentities: a mask and-ed with a constant True is the mask (no boolean constant buffer)."""

import numpy as np
from testutil import as_numpy, build, op_names, to_tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp


@I.ir_module
class CausalMask:
    @R.function
    def main(i: R.Tensor((4, 4), "int32"), j: R.Tensor((4, 4), "int32")) -> R.Tensor((4, 4), "bool"):
        with R.dataflow():
            always = R.full(R.shape([]), R.const(True, "bool"), dtype="bool")
            below = R.less_equal(j, i)
            mask = R.bitwise_and(always, below)
            never = R.const(False, "bool")
            same = R.logical_or(mask, never)
            R.output(same)
        return same


def test_identities_are_dropped() -> None:
    after = op_names(mp.FoldBoolIdentities()(CausalMask))
    assert after == ["relax.less_equal"]


def test_the_mask_is_unchanged() -> None:
    i, j = np.meshgrid(np.arange(4, dtype=np.int32), np.arange(4, dtype=np.int32), indexing="ij")
    got = as_numpy(build(mp.FoldBoolIdentities()(CausalMask))["main"](*to_tvm(i, j)))[0]
    np.testing.assert_array_equal(got, j <= i)

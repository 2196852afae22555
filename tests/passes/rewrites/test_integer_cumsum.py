"""IntegerCumsum: a cumulative sum of a boolean mask counts, as torch.cumsum does."""

import numpy as np
from testutil import as_numpy, build, op_names, to_tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp


@I.ir_module
class Positions:
    @R.function
    def main(mask: R.Tensor((1, 6), "int32")) -> R.Tensor((1, 6), "bool"):
        with R.dataflow():
            keep = R.not_equal(mask, R.const(0, "int32"))
            count = R.cumsum(keep, axis=-1)
            same = R.equal(count, R.const(2, "bool"))
            R.output(same)
        return same


def test_boolean_cumsum_counts_in_int32() -> None:
    after = mp.IntegerCumsum()(Positions)
    assert "relax.astype" in op_names(after)
    assert after["main"].body.blocks[0].bindings[2].var.ty.dtype == "int32"


def test_counts_match_numpy() -> None:
    mask = np.array([[1, 0, 1, 1, 0, 1]], dtype=np.int32)
    counts = np.cumsum(mask != 0, axis=-1)
    got = as_numpy(build(mp.IntegerCumsum()(Positions))["main"](*to_tvm(mask)))[0]
    np.testing.assert_array_equal(got, counts == 1)  # the constant True is 1 once compared with counts

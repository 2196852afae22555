"""ClampGatherIndices: an embedding lookup with ids past the table reads the nearest row, not memory."""

import numpy as np
import tvm
from testutil import as_numpy, build, to_tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp


@I.ir_module
class Embedding:
    @R.function
    def main(ids: R.Tensor((1, 6), "int32"), table: R.Tensor((10, 4), "float32")) -> R.Tensor((1, 6, 4), "float32"):
        with R.dataflow():
            out = R.take(table, ids, axis=0)
            R.output(out)
        return out


def _take_modes(mod: tvm.IRModule) -> list[str]:
    found: list[str] = []

    def visit(expr: tvm.relax.Expr) -> None:
        if isinstance(expr, tvm.relax.Call) and getattr(expr.op, "name", "") == "relax.take":
            found.append(str(expr.attrs.mode))

    tvm.relax.analysis.post_order_visit(mod["main"].body, visit)
    return found


def test_gathers_switch_to_clip_mode() -> None:
    assert _take_modes(Embedding) == ["fast"]
    assert _take_modes(mp.ClampGatherIndices()(Embedding)) == ["clip"]


def test_out_of_range_ids_read_the_nearest_row_and_in_range_ids_are_unchanged() -> None:
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    ids = np.array([[0, 3, 9, 10, 1_000_000_000, -5]], dtype=np.int32)
    vm = build(mp.ClampGatherIndices()(Embedding))
    got = as_numpy(vm["main"](*to_tvm(ids, table)))[0]
    np.testing.assert_array_equal(got[0], table[[0, 3, 9, 9, 9, 0]])

"""FiniteFloatLiterals: comparisons with infinity become exact comparisons with the largest finite value."""

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp

BIG = float(np.finfo(np.float32).max)


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((5,), "float32")):
        with R.dataflow():
            is_neg_inf = R.equal(x, R.const(float("-inf"), "float32"))
            not_pos_inf = R.not_equal(R.const(float("inf"), "float32"), x)
            masked = R.where(is_neg_inf, R.const(float("-inf"), "float32"), x)
            R.output(is_neg_inf, not_pos_inf, masked)
        return (is_neg_inf, not_pos_inf, masked)


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((5,), "float32")):
        with R.dataflow():
            is_neg_inf = R.less(x, R.const(-BIG, "float32"))
            not_pos_inf = R.less_equal(x, R.const(BIG, "float32"))
            masked = R.where(is_neg_inf, R.const(-BIG, "float32"), x)
            R.output(is_neg_inf, not_pos_inf, masked)
        return (is_neg_inf, not_pos_inf, masked)


def test_rewrite() -> None:
    after = mp.FiniteFloatLiterals()(Before)
    assert tvm_ffi.structural_equal(after, Expected, map_free_vars=True), after.script()


def test_comparisons_are_exact_and_fill_is_the_finite_bound() -> None:
    x = np.array([-np.inf, np.inf, np.nan, -BIG, 1.5], dtype="float32")
    results = []
    for mod in (Before, mp.FiniteFloatLiterals()(Before)):
        vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
        results.append([r.numpy() for r in vm["main"](tvm.runtime.tensor(x))])
    (eq0, ne0, fill0), (eq1, ne1, fill1) = results
    np.testing.assert_array_equal(eq0, eq1)
    np.testing.assert_array_equal(ne0, ne1)
    np.testing.assert_array_equal(fill1, np.where(eq0, -BIG, x))  # -inf fill becomes -max
    np.testing.assert_array_equal(fill0[1:], fill1[1:])

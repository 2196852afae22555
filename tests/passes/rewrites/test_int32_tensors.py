"""Int32Tensors: integer tensors WGSL lacks (64-, 16-, 8-bit) become int32 (uint32 for boolean casts)."""

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp
from mlcweb_passes.rewrites.int32_tensors import narrow_integer_tensors

INDEX = np.array([2, 0], "int64")


@I.ir_module
class Before:
    # torch SDPA's all-masked guard, CLIP's position ids and a take with a constant index.
    @R.function
    def main(x: R.Tensor((3, 4), "float32"), keep: R.Tensor((3, 4), "bool")):
        with R.dataflow():
            as_int = R.astype(keep, "int8")
            any_keep = R.max(as_int, axis=[1])
            guard = R.astype(any_keep, "bool")
            positions = R.arange(0, 4, 1, dtype="int64")
            shifted = R.add(positions, R.const(1, "int64"))
            rows = R.take(x, R.const(INDEX), axis=0)
            R.output(guard, shifted, rows)
        return (guard, shifted, rows)


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((3, 4), "float32"), keep: R.Tensor((3, 4), "bool")):
        with R.dataflow():
            as_int = R.astype(keep, "uint32")
            any_keep = R.max(as_int, axis=[1])
            guard = R.astype(any_keep, "bool")
            positions = R.arange(0, 4, 1, dtype="int32")
            shifted = R.add(positions, R.const(1, "int32"))
            rows = R.take(x, R.const(INDEX.astype("int32")), axis=0)
            R.output(guard, shifted, rows)
        return (guard, shifted, rows)


def test_rewrites_casts_ranges_and_constants() -> None:
    assert narrow_integer_tensors(Before) == {"main": ["any_keep", "as_int", "positions", "shifted"]}
    after = mp.Int32Tensors()(Before)
    assert tvm_ffi.structural_equal(after, Expected, map_free_vars=True), after.script()
    assert narrow_integer_tensors(after) == {}


def test_same_results() -> None:
    x = np.arange(12, dtype="float32").reshape(3, 4)
    keep = np.array([[0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1]], dtype=bool)
    results = []
    for mod in (Before, mp.Int32Tensors()(Before)):
        vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
        results.append([r.numpy() for r in vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(keep))])
    for before, after in zip(*results, strict=True):
        np.testing.assert_array_equal(before, after)
    assert results[1][1].dtype == np.int32


def test_constant_outside_int32_is_an_error() -> None:
    @I.ir_module
    class Big:
        @R.function
        def main(x: R.Tensor((2,), "int32")):
            y = R.add(R.astype(x, "int64"), R.const(2**40, "int64"))
            return y

    with pytest.raises(Exception, match="outside int32"):
        mp.Int32Tensors()(Big)

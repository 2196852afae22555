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


@I.ir_module
class PooledBefore:
    # CLIP's pooled output: the hidden state at the (first) position of the largest id, end-of-text.
    @R.function
    def main(ids: R.Tensor((2, 6), "int32"), hidden: R.Tensor((2, 6, 3), "float32")):
        with R.dataflow():
            eot = R.argmax(ids, axis=-1)
            rows = R.arange(0, 2, 1, dtype="int64")
            first = R.argmin(ids, axis=1, keepdims=True)
            flat = R.argmax(ids)
            pooled = R.take(R.reshape(hidden, (12, 3)), R.add(R.multiply(rows, R.const(6, "int64")), eot), axis=0)
            R.output(pooled, first, flat)
        return (pooled, first, flat)


def test_argmax_and_argmin_give_int32_first_positions() -> None:
    """Before: argmax/argmin typed int64 (a WebGPU build fails on the int64 reduction). After: every
    integer tensor is int32 and the numbers are the same, ties included (the first position wins)."""
    assert "eot" in narrow_integer_tensors(PooledBefore)["main"]
    after = mp.Int32Tensors()(PooledBefore)
    assert narrow_integer_tensors(after) == {}
    ids = np.array([[5, 9, 1, 9, -7, 3], [49406, 320, 49407, 49407, 0, -(2**31)]], dtype="int32")
    hidden = np.random.default_rng(0).standard_normal((2, 6, 3)).astype("float32")
    results = []
    for mod in (PooledBefore, after):
        vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
        results.append([r.numpy() for r in vm["main"](tvm.runtime.tensor(ids), tvm.runtime.tensor(hidden))])
    for before, now in zip(*results, strict=True):
        np.testing.assert_array_equal(before, now)
    np.testing.assert_array_equal(results[1][0], hidden[[0, 1], [1, 2]])  # first max: positions 1 and 2

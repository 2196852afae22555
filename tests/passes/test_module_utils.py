import numpy as np
import pytest
from testutil import build, function_names, to_tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import mlcweb_passes as mp


@I.ir_module
class Encoder:
    @T.prim_func(private=True, s_tir=True)
    def double(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
        for i in range(4):
            with T.sblock("b"):
                vi = T.axis.spatial(4, i)
                b[vi] = a[vi] * T.float32(2)

    @R.function
    def encode(x: R.Tensor((4,), "float32")) -> R.Tensor((4,), "float32"):
        cls = Encoder
        y = R.call_tir(cls.double, (x,), out_ty=R.Tensor((4,), "float32"))
        return y


@I.ir_module
class Decoder:
    @T.prim_func(private=True, s_tir=True)
    def double(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
        for i in range(4):
            with T.sblock("b"):
                vi = T.axis.spatial(4, i)
                b[vi] = a[vi] * T.float32(2)

    @T.prim_func(private=True, s_tir=True)
    def unused(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
        for i in range(4):
            with T.sblock("b"):
                vi = T.axis.spatial(4, i)
                b[vi] = a[vi]

    @R.function
    def decode(x: R.Tensor((4,), "float32")) -> R.Tensor((4,), "float32"):
        cls = Decoder
        y = R.call_tir(cls.double, (x,), out_ty=R.Tensor((4,), "float32"))
        return y


@I.ir_module
class Clashing:
    @R.function
    def encode(x: R.Tensor((4,), "float32")) -> R.Tensor((4,), "float32"):
        return R.add(x, x)


def test_merge_joins_functions_and_shares_identical_ones() -> None:
    merged = mp.merge_modules(Encoder, Decoder)
    assert function_names(merged) == ["decode", "double", "encode", "unused"]
    vm = build(merged)  # every call site points at a function of the merged module
    x = np.arange(4, dtype="float32")
    np.testing.assert_array_equal(vm["encode"](*to_tvm(x)).numpy(), 2 * x)
    np.testing.assert_array_equal(vm["decode"](*to_tvm(x)).numpy(), 2 * x)


def test_merge_name_clash_names_both_modules() -> None:
    with pytest.raises(mp.FunctionNameClashError, match="'encode' is defined by both text_encoder and other"):
        mp.merge_modules(Encoder, Clashing, names=["text_encoder", "other"])


def test_remove_unused_functions() -> None:
    assert "unused" in function_names(Decoder)
    pruned = mp.RemoveUnusedFunctions()(Decoder)
    assert function_names(pruned) == ["decode", "double"]
    only_encode = mp.RemoveUnusedFunctions(["encode"])(mp.merge_modules(Encoder, Decoder))
    assert function_names(only_encode) == ["double", "encode"]


def test_remove_unused_rejects_unknown_entry() -> None:
    with pytest.raises(KeyError, match="nope"):
        mp.RemoveUnusedFunctions(["nope"])(Decoder)

import numpy as np
import tvm
import tvm_ffi
from testutil import as_numpy, build, to_tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp


@I.ir_module
class ResnetTail:
    """A convolution with float32 bias and residual adds, then a group norm and a second residual use of
    the sum: the float32 tensor crosses from the convolution's kernel to two others."""

    @R.function
    def main(
        x: R.Tensor((1, 8, 8, 32), "float16"),
        w: R.Tensor((32, 3, 3, 32), "float16"),
        b: R.Tensor((32,), "float32"),
        gamma: R.Tensor((32,), "float32"),
        beta: R.Tensor((32,), "float32"),
        res: R.Tensor((1, 8, 8, 32), "float32"),
    ) -> R.Tensor((1, 8, 8, 32), "float16"):
        with R.dataflow():
            c = R.nn.conv2d(x, w, padding=[1, 1, 1, 1], data_layout="NHWC", kernel_layout="OHWI", out_dtype="float32")
            h = R.add(R.add(c, b), res)
            n = R.nn.group_norm(h, gamma, beta, num_groups=4, channel_axis=3, axes=[1, 2])
            y = R.astype(R.add(R.nn.silu(n), h), "float16")
            R.output(y)
        return y


def _kernel_outputs(mod: tvm.IRModule) -> dict[str, str]:
    """Each fused kernel's name and the dtype of its last parameter (its output)."""
    fused = mp.FuseOperators()(mod)
    return {
        gv.name_hint: str(f.params[-1].dtype) for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
    }


def test_the_sum_crosses_kernels_as_float16_and_the_norm_reads_it() -> None:
    before = _kernel_outputs(ResnetTail)
    assert [d for n, d in before.items() if n.startswith("fused_conv2d")] == ["float32"]
    after_mod = mp.Float16NormInputs()(ResnetTail)
    norm = next(
        b.value for b in after_mod["main"].body.blocks[0].bindings if "group_norm" in str(getattr(b.value, "op", ""))
    )
    assert str(norm.args[0].ty.dtype) == "float16" and str(norm.args[1].ty.dtype) == "float16"
    after = _kernel_outputs(after_mod)
    assert [d for n, d in after.items() if n.startswith("fused_conv2d")] == ["float16"]
    assert len([n for n in after if "group_norm" in n]) == 1  # the widening cast joined the norm's kernel


def test_float16_storage_stays_within_float16_rounding() -> None:
    rng = np.random.default_rng(0)
    args = [
        rng.standard_normal((1, 8, 8, 32)).astype(np.float16),
        (rng.standard_normal((32, 3, 3, 32)) * 0.1).astype(np.float16),
        rng.standard_normal(32).astype(np.float32),
        (1 + 0.1 * rng.standard_normal(32)).astype(np.float32),
        (0.1 * rng.standard_normal(32)).astype(np.float32),
        rng.standard_normal((1, 8, 8, 32)).astype(np.float32),
    ]
    expected = as_numpy(build(ResnetTail)["main"](*to_tvm(*args)))[0].astype(np.float32)
    got = as_numpy(build(mp.Float16NormInputs()(ResnetTail))["main"](*to_tvm(*args)))[0].astype(np.float32)
    assert not np.array_equal(got, expected)  # it does round
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-2 * float(np.abs(expected).max()))


def test_float32_norm_inputs_that_are_function_inputs_are_left_alone() -> None:
    @I.ir_module
    class NormOfInput:
        @R.function
        def main(
            x: R.Tensor((2, 16), "float32"), g: R.Tensor((16,), "float32"), b: R.Tensor((16,), "float32")
        ) -> R.Tensor((2, 16), "float32"):
            with R.dataflow():
                y = R.nn.layer_norm(x, g, b, axes=[-1])
                R.output(y)
            return y

    after = mp.Float16NormInputs()(NormOfInput)
    assert tvm_ffi.structural_equal(after, NormOfInput)
    assert isinstance(after["main"], relax.Function)

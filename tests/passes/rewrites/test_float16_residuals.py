import numpy as np
import tvm
import tvm_ffi
from testutil import as_numpy, build, kernel_launches, to_tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp


@I.ir_module
class ResnetWithShortcut:
    """A VAE resnet's tail as mixed precision leaves it: the main branch's convolution and the 1x1
    shortcut convolution, each with a float32 bias, summed in float32 and scaled; the sum upsampled."""

    @R.function
    def main(
        x: R.Tensor((1, 8, 8, 32), "float16"),
        h: R.Tensor((1, 8, 8, 32), "float16"),
        w: R.Tensor((16, 3, 3, 32), "float16"),
        b: R.Tensor((16,), "float32"),
        ws: R.Tensor((16, 1, 1, 32), "float16"),
        bs: R.Tensor((16,), "float32"),
    ) -> R.Tensor((1, 16, 16, 16), "float16"):
        with R.dataflow():
            c = R.nn.conv2d(h, w, padding=[1, 1, 1, 1], data_layout="NHWC", kernel_layout="OHWI", out_dtype="float32")
            main = R.add(R.astype(R.astype(c, "float16"), "float32"), b)
            s = R.nn.conv2d(x, ws, data_layout="NHWC", kernel_layout="OHWI", out_dtype="float32")
            short = R.add(R.astype(R.astype(s, "float16"), "float32"), bs)
            out = R.divide(R.add(short, main), R.const(1.0, "float32"))
            up = R.image.resize2d(out, R.shape([16, 16]), layout="NHWC", method="nearest_neighbor")
            y = R.astype(up, "float16")
            R.output(y)
        return y


def _crossing_dtypes(mod: tvm.IRModule) -> list[str]:
    """Dtypes of the tensors one fused kernel writes and another reads (not the function's output)."""
    fused = mp.FuseOperators()(mod)
    out = fused["main"].body.body
    return [str(b.var.ty.dtype) for b in kernel_launches(fused) if not b.var.same_as(out)]


def test_shortcut_and_upsampler_input_cross_kernels_as_float16() -> None:
    assert _crossing_dtypes(ResnetWithShortcut).count("float32") == 2  # the shortcut branch; the scaled sum
    after = mp.Float16Residuals()(ResnetWithShortcut)
    assert _crossing_dtypes(after) == ["float16", "float16"]
    bindings = after["main"].body.blocks[0].bindings
    adds = [b.value for b in bindings if getattr(getattr(b.value, "op", None), "name", "") == "relax.add"]
    assert [str(a.ty.dtype) for a in adds[-1].args] == ["float16", "float16"]  # the residual add; biases float32


def test_float16_residuals_round_as_pytorch_float16_does() -> None:
    rng = np.random.default_rng(0)
    args = [
        rng.standard_normal((1, 8, 8, 32)).astype(np.float16),
        rng.standard_normal((1, 8, 8, 32)).astype(np.float16),
        (rng.standard_normal((16, 3, 3, 32)) * 0.1).astype(np.float16),
        rng.standard_normal(16).astype(np.float32),
        (rng.standard_normal((16, 1, 1, 32)) * 0.2).astype(np.float16),
        rng.standard_normal(16).astype(np.float32),
    ]
    expected = as_numpy(build(ResnetWithShortcut)["main"](*to_tvm(*args)))[0].astype(np.float32)
    got = as_numpy(build(mp.Float16Residuals()(ResnetWithShortcut))["main"](*to_tvm(*args)))[0].astype(np.float32)
    # the float16 add rounds its operands' sum once more: at most one float16 step of the output
    step = float(np.abs(expected).max()) * 2.0**-10
    assert not np.array_equal(got, expected)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2 * step)


def test_adds_of_inputs_and_of_float16_tensors_are_left_alone() -> None:
    @I.ir_module
    class Plain:
        @R.function
        def main(
            a: R.Tensor((4, 8), "float32"), h: R.Tensor((4, 8), "float16"), w: R.Tensor((8, 8), "float16")
        ) -> R.Tensor((4, 8), "float32"):
            with R.dataflow():
                m = R.matmul(h, w, out_dtype="float32")
                y = R.add(R.add(a, m), R.astype(h, "float32"))  # an input, and a widened float16 tensor
                R.output(y)
            return y

    assert tvm_ffi.structural_equal(mp.Float16Residuals()(Plain), Plain)


@I.ir_module
class FeedForwardGEGLU:
    """A transformer's feed-forward entry after mixed precision: the projection's float32 output (bias
    added) reshaped to tokens and split into the GEGLU's halves."""

    @R.function
    def main(
        x: R.Tensor((32, 8), "float16"), w: R.Tensor((8, 16), "float16"), b: R.Tensor((16,), "float32")
    ) -> R.Tensor((2, 16, 8), "float16"):
        with R.dataflow():
            h = R.add(R.astype(R.astype(R.matmul(x, w, out_dtype="float32"), "float16"), "float32"), b)
            tokens = R.reshape(h, R.shape([2, 16, 16]))
            halves = R.split(tokens, 2, axis=-1)
            y = R.astype(R.multiply(halves[0], R.nn.gelu(halves[1])), "float16")
            R.output(y)
        return y


def test_linear_output_read_through_a_reshape_crosses_as_float16() -> None:
    assert _crossing_dtypes(FeedForwardGEGLU) == ["float32"]  # the projection's kernel writes float32
    after = mp.Float16Residuals()(FeedForwardGEGLU)
    assert _crossing_dtypes(after) == ["float16"]
    rng = np.random.default_rng(1)
    args = [
        rng.standard_normal((32, 8)).astype(np.float16),
        (rng.standard_normal((8, 16)) * 0.3).astype(np.float16),
        rng.standard_normal(16).astype(np.float32),
    ]
    expected = as_numpy(build(FeedForwardGEGLU)["main"](*to_tvm(*args)))[0].astype(np.float32)
    got = as_numpy(build(after)["main"](*to_tvm(*args)))[0].astype(np.float32)
    # the projection is rounded to float16 once more (as PyTorch float16 stores it): about one step
    step = float(np.abs(expected).max()) * 2.0**-10
    assert not np.array_equal(got, expected)
    np.testing.assert_allclose(got, expected, rtol=0, atol=4 * step)

import re

import numpy as np
import tvm
import tvm_ffi
from testutil import as_numpy, build, kernel_launches, to_tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp


@I.ir_module
class TransformerEntry:
    """An SD transformer block's entry as mixed precision leaves it: proj_in's float32 output reshaped and
    narrowed; the layer norm's float16 output widened, reshaped and narrowed back for the Q projection;
    the heads split by two reshapes, merged back through a same-shape broadcast."""

    @R.function
    def main(
        x: R.Tensor((2, 4, 4, 8), "float16"),
        w: R.Tensor((8, 1, 1, 8), "float16"),
        b: R.Tensor((8,), "float32"),
        g: R.Tensor((8,), "float16"),
        beta: R.Tensor((8,), "float16"),
        wq: R.Tensor((8, 8), "float16"),
    ) -> R.Tensor((2, 16, 8), "float16"):
        with R.dataflow():
            c = R.nn.conv2d(x, w, data_layout="NHWC", kernel_layout="OHWI", out_dtype="float32")
            proj = R.add(c, b)
            tokens = R.astype(R.reshape(proj, R.shape([2, 16, 8])), "float16")
            norm = R.nn.layer_norm(tokens, g, beta, axes=[2])
            wide = R.astype(norm, "float32")
            rows = R.astype(R.reshape(wide, R.shape([32, 8])), "float16")
            q = R.astype(R.matmul(rows, wq, out_dtype="float32"), "float16")
            heads = R.reshape(R.reshape(q, R.shape([2, 16, 8])), R.shape([2, 16, 2, 4]))
            merged = R.broadcast_to(R.reshape(heads, R.shape([2, 16, 8])), R.shape([2, 16, 8]))
            out = R.astype(R.matmul(merged, wq, out_dtype="float32"), "float16")
            R.output(out)
        return out


@I.ir_module
class TransformerEntryHoisted:
    @R.function
    def main(
        x: R.Tensor((2, 4, 4, 8), "float16"),
        w: R.Tensor((8, 1, 1, 8), "float16"),
        b: R.Tensor((8,), "float32"),
        g: R.Tensor((8,), "float16"),
        beta: R.Tensor((8,), "float16"),
        wq: R.Tensor((8, 8), "float16"),
    ) -> R.Tensor((2, 16, 8), "float16"):
        with R.dataflow():
            c = R.nn.conv2d(x, w, data_layout="NHWC", kernel_layout="OHWI", out_dtype="float32")
            proj = R.add(c, b)
            tokens = R.reshape(R.astype(proj, "float16"), R.shape([2, 16, 8]))
            norm = R.nn.layer_norm(tokens, g, beta, axes=[2])
            rows = R.reshape(norm, R.shape([32, 8]))
            q = R.astype(R.matmul(rows, wq, out_dtype="float32"), "float16")
            merged = R.reshape(q, R.shape([2, 16, 8]))
            out = R.astype(R.matmul(merged, wq, out_dtype="float32"), "float16")
            R.output(out)
        return out


def test_casts_move_to_producers_and_layout_copies_go() -> None:
    after = mp.HoistNarrowingCasts()(TransformerEntry)
    tvm.ir.assert_structural_equal(after, TransformerEntryHoisted)
    # fused, with reshape-only kernels made views as the build does: proj_in's kernel and the norm write
    # float16 and no reshape-and-cast kernel follows them; the heads' reshapes are a view, not a copy
    assert _kernels(TransformerEntry) == [
        ("fused_conv2d_add", "float32"),
        ("fused_reshape_cast", "float16"),
        ("fused_layer_norm_cast", "float32"),
        ("fused_reshape_cast", "float16"),
        ("fused_matmul_cast", "float16"),
        ("fused_reshape_reshape_reshape_broadcast_to", "float16"),
        ("fused_matmul_cast", "float16"),
    ]
    assert _kernels(after) == [
        ("fused_conv2d_add_cast", "float16"),
        ("layer_norm", "float16"),
        ("fused_matmul_cast", "float16"),
        ("fused_matmul_cast", "float16"),
    ]


def _kernels(mod: tvm.IRModule) -> list[tuple[str, str]]:
    """(PrimFunc name without numbers, output dtype) of each kernel launched after fusion and
    ``RewriteDataflowReshape``."""
    fused = tvm.relax.transform.RewriteDataflowReshape()(mp.FuseOperators()(mod))
    return [
        (re.sub(r"\d+(?=_|$)", "", str(b.value.args[0].name_hint)), str(b.var.ty.dtype)) for b in kernel_launches(fused)
    ]


def test_values_are_unchanged_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    args = [
        rng.standard_normal((2, 4, 4, 8)).astype(np.float16),
        (rng.standard_normal((8, 1, 1, 8)) * 0.3).astype(np.float16),
        rng.standard_normal(8).astype(np.float32),
        rng.standard_normal(8).astype(np.float16),
        rng.standard_normal(8).astype(np.float16),
        (rng.standard_normal((8, 8)) * 0.3).astype(np.float16),
    ]
    expected = as_numpy(build(TransformerEntry)["main"](*to_tvm(*args)))[0]
    got = as_numpy(build(mp.HoistNarrowingCasts()(TransformerEntry))["main"](*to_tvm(*args)))[0]
    np.testing.assert_array_equal(got, expected)


def test_widening_casts_and_shared_layout_results_are_left_alone() -> None:
    @I.ir_module
    class Kept:
        @R.function
        def main(x: R.Tensor((4, 8), "float32"), h: R.Tensor((4, 8), "float16")) -> R.Tuple(
            R.Tensor((32,), "float16"), R.Tensor((32,), "float32"), R.Tensor((4, 8), "float32")
        ):
            with R.dataflow():
                flat = R.reshape(x, R.shape([32]))  # also returned as float32: the cast stays after it
                narrow = R.astype(flat, "float16")
                widened = R.astype(h, "float32")  # widening: not moved
                out = (narrow, flat, widened)
                R.output(out)
            return out

    assert tvm_ffi.structural_equal(mp.HoistNarrowingCasts()(Kept), Kept)

"""A zero ``pad`` of the spatial axes feeding a ``conv2d`` becomes the convolution's own padding.

diffusers' VAE encoder downsamples with ``F.pad(x, (0, 1, 0, 1))`` and a stride-2, unpadded 3x3
convolution. As a separate operator the pad costs a kernel and a copy of the activation; worse, fusion
attaches it to the *previous* convolution as an epilogue of another shape, and the schedule that results
keeps that convolution's whole output in workgroup memory (128 KiB for a 32x32x32 tile: more than
WebGPU's 32 KiB, so the build fails). Relax's ``conv2d`` pads each side on its own
(``[top, left, bottom, right]``), so the asymmetric pad folds into it exactly: the convolution reads the
unpadded input and treats the border as zeros, as the pad did.

Only a constant pad with value 0 on the two spatial axes of the convolution's layout (NCHW or NHWC)
folds, directly or through a cast (float16 builds cast the padded tensor); other pads stay. A pad with
other users stays for them.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from .._relax import FunctionMutator, ModulePassBase, op_name, rewrite_and_clean

__all__ = ["FoldPadIntoConv"]

log = logging.getLogger(__name__)


def _spatial_pads(pad: relax.Call, layout: str) -> tuple[int, int, int, int] | None:
    """``(top, left, bottom, right)`` of a zero pad of ``layout``'s H and W only, else None."""
    attrs = pad.attrs
    if str(attrs.pad_mode) != "constant" or float(attrs.pad_value) != 0.0 or layout not in ("NCHW", "NHWC"):
        return None
    widths = [int(w) for w in attrs.pad_width]
    if len(widths) != 8:
        return None
    h, w = layout.index("H"), layout.index("W")
    if any(widths[2 * axis] or widths[2 * axis + 1] for axis in range(4) if axis not in (h, w)):
        return None
    return widths[2 * h], widths[2 * w], widths[2 * h + 1], widths[2 * w + 1]


@mutator
class _Fold(FunctionMutator):
    def visit_call_(self, op: relax.Call) -> relax.Expr:
        call = super().visit_call_(op)
        if op_name(call) != "relax.nn.conv2d" or self.bindings is None:
            return call
        pad = self.bindings.value(call.args[0])
        cast = None
        if op_name(pad) == "relax.astype":  # float16 builds: the pad in float32, then a cast
            cast = str(pad.attrs.dtype)
            pad = self.bindings.value(pad.args[0])
        if op_name(pad) != "relax.nn.pad":
            return call
        extra = _spatial_pads(pad, str(call.attrs.data_layout))
        if extra is None:
            return call
        data = pad.args[0] if cast is None else relax.op.astype(pad.args[0], cast)
        attrs = call.attrs
        padding = [int(p) + e for p, e in zip(attrs.padding, extra, strict=True)]
        out_dtype = str(attrs.out_dtype)
        self.rewritten += 1
        return relax.op.nn.conv2d(
            data,
            call.args[1],
            strides=[int(s) for s in attrs.strides],
            padding=padding,
            dilation=[int(d) for d in attrs.dilation],
            groups=int(attrs.groups),
            data_layout=str(attrs.data_layout),
            kernel_layout=str(attrs.kernel_layout),
            out_layout=str(attrs.out_layout),
            out_dtype=None if out_dtype in ("", "None", "void") else out_dtype,
        )


@tvm.transform.module_pass(opt_level=0, name="mlcweb.FoldPadIntoConv")
class FoldPadIntoConv(ModulePassBase):
    """Zero spatial pads feeding ``conv2d`` become its padding (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Fold(mod)
        result = rewrite_and_clean(mod, rewriter)
        if rewriter.rewritten:
            log.info("%d zero pads folded into their convolutions' padding", rewriter.rewritten)
        return result

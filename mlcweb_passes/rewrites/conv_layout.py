"""Convolution layout: NCHW convolutions become NHWC (channels last) with OHWI kernels.

PyTorch models import as NCHW convolutions with OIHW kernels. As an implicit GEMM, such a convolution
reads its input tile along the reduction axis (input channel x kernel row x kernel column), which in
NCHW is strided: no vector loads and uncoalesced global reads. In NHWC the input channel is innermost,
so the reduction axis is contiguous for each kernel position, OHWI kernels are contiguous along it too,
and the output channel, the GEMM's column, is contiguous in the output. GPU GEMM schedules (tensor
cores above all) need exactly that.

The pass runs Relax's ``ConvertLayout`` for ``relax.nn.conv2d`` and lets the layout flow through the ops
that can carry it (group norm, elementwise, concatenation, resize); ``permute_dims`` go in only where an
op needs the original layout (before the reshapes of attention blocks). Run it before weight lifting
(:func:`~mlcweb_passes.split_transform_params`): the kernels' OIHW to OHWI transposes then depend on
weights only and move into the transform module, so the deployed weights are stored OHWI and no kernel
transposes at run time. The functions' inputs and outputs keep their layout.
"""

from __future__ import annotations

import tvm
from tvm import relax

from .._relax import ModulePassBase

__all__ = ["ConvLayout"]


@tvm.transform.module_pass(opt_level=0, name="mlcweb.ConvLayout")
class ConvLayout(ModulePassBase):
    """Rewrite ``conv2d`` to ``data_layout`` / ``kernel_layout`` (NHWC / OHWI by default)."""

    def __init__(self, data_layout: str = "NHWC", kernel_layout: str = "OHWI") -> None:
        if sorted(data_layout) != sorted("NCHW") or sorted(kernel_layout) != sorted("OIHW"):
            raise ValueError(
                f"conv layouts must be permutations of NCHW and OIHW, not {data_layout!r} / {kernel_layout!r}"
            )
        self.data_layout = data_layout
        self.kernel_layout = kernel_layout

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return tvm.transform.Sequential(
            [
                relax.transform.ConvertToDataflow(),
                relax.transform.ConvertLayout({"relax.nn.conv2d": [self.data_layout, self.kernel_layout]}),
                relax.transform.CanonicalizeBindings(),
            ]
        )(mod)

"""Mixed precision: float16 compute and storage with float32 accumulation where it matters.

Halving weights and activations halves memory traffic, which is what bounds most kernels of a diffusion
model, and lets GPUs use their float16 units. Done naively it breaks numerics: long dot products
(matmul, convolution) and reductions (softmax, mean, sum) lose precision in float16. This pass wraps
``relax.transform.ToMixedPrecision``:

- matmul / conv / attention take float16 inputs and accumulate in ``accumulate_dtype`` (float32 by
  default), then store float16;
- softmax, mean, sum and other reductions stay in float32 (TVM's "never" policy);
- elementwise ops follow their inputs;
- weights get an ``astype`` to float16 that :func:`~mlcweb_passes.split_transform_params` lifts into the
  transform module, so the deployed weights are stored in float16.

The function signature is unchanged (float32 in, float32 out) unless ``fp16_inputs`` names inputs
to take as float16. A function carrying the attribute ``KEEP_FLOAT32_ATTR`` (``"mlcweb.keep_float32"``)
is left in float32: a network whose activations overflow float16 (SDXL's VAE, which diffusers upcasts
for the same reason) runs in float32 inside an otherwise float16 build.
"""

from __future__ import annotations

from collections.abc import Sequence

import tvm
from tvm import relax

from .._relax import ModulePassBase

__all__ = ["KEEP_FLOAT32_ATTR", "MixedPrecision"]

KEEP_FLOAT32_ATTR = "mlcweb.keep_float32"


@tvm.transform.module_pass(opt_level=0, name="mlcweb.MixedPrecision")
class MixedPrecision(ModulePassBase):
    """Convert float32 compute to float16 with ``accumulate_dtype`` accumulators."""

    def __init__(self, accumulate_dtype: str = "float32", fp16_inputs: Sequence[str] = ()) -> None:
        if accumulate_dtype not in ("float32", "float16"):
            raise ValueError(f"accumulate_dtype must be 'float32' or 'float16', not {accumulate_dtype!r}")
        self.accumulate_dtype = accumulate_dtype
        self.fp16_inputs = list(fp16_inputs)

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        kept = {
            gv: func
            for gv, func in mod.functions_items()
            if func.attrs is not None and KEEP_FLOAT32_ATTR in func.attrs and bool(func.attrs[KEEP_FLOAT32_ATTR])
        }
        rest = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv not in kept}, attrs=mod.attrs)
        out = tvm.transform.Sequential(
            [
                relax.transform.ConvertToDataflow(),
                relax.transform.ToMixedPrecision(self.accumulate_dtype, self.fp16_inputs or None),
                relax.transform.CanonicalizeBindings(),
            ]
        )(rest)
        for gv, func in kept.items():
            out[gv] = func
        return out

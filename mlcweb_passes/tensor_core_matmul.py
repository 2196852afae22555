"""A CUDA schedule rule: float16 matmuls with a short dimension on tensor cores too.

dlight's ``Matmul`` rule sends a float16 matmul to tensor cores (``MatmulTensorization``, WMMA 16x16x16
tiles) only when every dimension is longer than 64; otherwise it uses CUDA cores. Attention has exactly
such matmuls: a head dimension of 40 (SD1.5) is the reduction of ``Q @ K^T`` and the output width of
``P @ V``, and there are 77 text tokens in cross-attention. On CUDA cores those two matmuls take about
11 ms of SD's 200 ms UNet step on an H100; on tensor cores, with the short dimension zero-padded to the
tile, they take a fraction of that.

:class:`TensorCoreMatmul` applies ``MatmulTensorization`` to float16 matmuls (and convolutions, which it
handles as implicit GEMMs) on CUDA sm_70+ when every axis is at least ``min_extent`` long and some axis
is 64 or shorter (the ones dlight's rule leaves on CUDA cores). Shorter axes, as in GEMVs, fall through.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.gpu.matmul import (
    MatmulTensorization,
    check_sm_version,
    get_in_out_dtypes,
    get_index_map,
    get_reduction_blocks,
)
from tvm.target import Target

from ._base import uses_var

__all__ = ["TensorCoreMatmul"]

DLIGHT_TENSORIZE_THRESHOLD = 64


class TensorCoreMatmul(dl.ScheduleRule):
    """``MatmulTensorization`` for float16 matmuls whose shortest non-batch axis is in ``[min_extent, 64]``."""

    def __init__(self, min_extent: int = 16) -> None:
        self.min_extent = min_extent

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if (
            not isinstance(func, tirx.PrimFunc)
            or target.kind.name != "cuda"
            or check_sm_version(str(target.attrs.get("arch", ""))) < 70
        ):
            return None
        sch = s_tir.Schedule(func)
        blocks = get_reduction_blocks(sch, sch.get_child_blocks(sch.get_sblock("root")))
        if not blocks:
            return None
        block = sch.get(blocks[0])
        if get_index_map(block) is None or get_in_out_dtypes(block)[0] != "float16":
            return None
        values = _non_batch_extents(block)
        if values is None or min(values) < self.min_extent or min(values) > DLIGHT_TENSORIZE_THRESHOLD:
            return None
        try:
            result: s_tir.Schedule | None = MatmulTensorization().apply(func, target, tunable)
        except (AssertionError, s_tir.ScheduleError):  # shapes the fixed tiling cannot cover
            return None
        return result


def _non_batch_extents(block: tirx.SBlock) -> list[int] | None:
    """Extents of the block's axes other than batch axes (those indexing both inputs and the output)."""
    if len(block.reads) < 2 or len(block.writes) != 1:
        return None
    regions = [block.reads[0].region, block.reads[1].region, block.writes[0].region]

    values = []
    for iv in block.iter_vars:
        if not isinstance(iv.dom.extent, tirx.IntImm):
            return None
        if all(any(uses_var(r.min, iv.var) for r in region) for region in regions):
            continue
        values.append(int(iv.dom.extent.value))
    return values or None

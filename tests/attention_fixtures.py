"""Flash-attention fixtures shared by the tests of WebGPU's attention kernels on subgroup matrices and on
the lanes: a module calling the portable kernel (the shader they replace), float64 numpy's attention, and
the planning pass's plans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from mlcweb_passes.cuda.flash_kernel import AttentionShape, Views
from mlcweb_passes.webgpu.flash_attention import WebGPUFlashTile, webgpu_flash_attention_kernel
from mlcweb_passes.webgpu.matrix_attention import PLANS_ATTR, PlanMatrixAttention
from mlcweb_passes.webgpu.matrix_gemm import MatrixConfig

CONFIG = MatrixConfig()
LAVAPIPE_ICD = Path("/usr/share/vulkan/icd.d/lvp_icd.json")


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    s = np.einsum("bnhd,bmhd->bhnm", q.astype(np.float64), k.astype(np.float64)) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhnm,bmhd->bnhd", p / p.sum(-1, keepdims=True), v.astype(np.float64))


def attention_module(
    shape: AttentionShape,
    views: Views = (None, None, None),
    dtype: str = "float16",
    *,
    scale: float | None = None,
    tile: WebGPUFlashTile | None = None,
    max_shared: int = 32768,
) -> tvm.IRModule:
    """``main(q, k, v)`` calling the portable kernel (scale ``head_dim ** -0.5`` unless given, ``tile`` or
    the one chosen within ``max_shared``); with views, ``main(qkv)`` of merged projections
    ``[B, N, 3, H, D]`` (self-attention)."""
    s = shape
    bb = relax.BlockBuilder()
    scale = s.head_dim**-0.5 if scale is None else scale
    kernel = webgpu_flash_attention_kernel(s, scale, views, dtype=dtype, max_shared=max_shared, tile=tile)
    if views[0] is not None:
        args = [relax.Var("qkv", relax.TensorType((s.batch, s.q_len, 3, s.heads, s.head_dim), dtype))]
        inputs = args * 3
    else:
        args = [
            relax.Var(name, relax.TensorType((s.batch, n, s.heads, s.head_dim), dtype))
            for name, n in (("q", s.q_len), ("k", s.kv_len), ("v", s.kv_len))
        ]
        inputs = args
    with bb.function("main", args):
        with bb.dataflow():
            gv = bb.add_func(kernel, "flash_attention")
            call = relax.call_tir(gv, inputs, relax.TensorType((s.batch, s.q_len, s.heads, s.head_dim), dtype))
            out = bb.emit_output(bb.emit(call))
        bb.emit_func_output(out)
    return bb.get()


def attention_plans(mod: tvm.IRModule, max_shared: int | None = None, lanes: bool = False) -> dict[str, str]:
    from webgpu_node import WEBGPU

    with WEBGPU:
        planned = PlanMatrixAttention(CONFIG, max_shared, lanes=lanes)(mod)
    return {str(k): str(v) for k, v in (planned.attrs or {}).get(PLANS_ATTR, {}).items()}

"""The values command-line options take, in a module that imports nothing heavy (``mlcweb serve`` and
``mlcweb --help`` must not load TVM)."""

from __future__ import annotations

__all__ = ["DTYPES", "ENCODINGS", "TARGET_NAMES", "WEBGPU_ATTENTION"]

DTYPES = ("float32", "float16")
ENCODINGS = ("raw", "f32-to-bf16")
TARGET_NAMES = ("llvm", "cuda", "vulkan", "metal", "webgpu")
# mlcweb_passes.WEBGPU_ATTENTION: the float16 flash attentions' kernel beside the portable one on WebGPU
WEBGPU_ATTENTION = ("matrix", "lanes", "portable")

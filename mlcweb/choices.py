"""The values command-line options take, in a module that imports nothing heavy (``mlcweb serve`` and
``mlcweb --help`` must not load TVM)."""

from __future__ import annotations

__all__ = ["DTYPES", "ENCODINGS", "TARGET_NAMES"]

DTYPES = ("float32", "float16")
ENCODINGS = ("raw", "f32-to-bf16")
TARGET_NAMES = ("llvm", "cuda", "vulkan", "metal", "webgpu")

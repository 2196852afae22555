"""The CUDA context's per-thread stack reservation, sized to what mlcweb's kernels need.

A CUDA context reserves stack (local memory) for every thread the GPU can hold at once: the per-thread
stack limit, 1 KiB by default, times 2,048 threads times the multiprocessors. On an H100 (132 SMs) that
is 264 MiB. mlcweb's kernels need far less: the largest frame in SD1.5's build is 64 bytes (flash
attention at head dimension 160 spills that much).

Lowering the limit is safe for kernels that need more: "the driver automatically increases the per-thread
stack size for each kernel launch as needed" (CUDA runtime API, ``cudaLimitStackSize``). Set it before
the first launch: lowering it to 64 bytes after SD's CLIP had been captured in a CUDA graph made the next
CLIP call fail (H100; whether the captured graph or a frame over 64 bytes caused it was not isolated).
Measured (H100, SD1.5 float16): lowering it from 1 KiB to 256 bytes frees 198 MiB; the whole pipeline's
peak fell from 2,496 to 2,298 MiB (``benchmarks/sd_gpu.py``, runs 16 and 18).
"""

from __future__ import annotations

import ctypes
import logging

__all__ = ["DEFAULT_CUDA_STACK_BYTES", "set_cuda_stack_limit"]

log = logging.getLogger(__name__)

DEFAULT_CUDA_STACK_BYTES = 256  # four times the largest frame of SD1.5's kernels
CU_LIMIT_STACK_SIZE = 0  # CUlimit enum of the driver API
DRIVER_DEFAULT_STACK_BYTES = 1024


def set_cuda_stack_limit(nbytes: int, *, only_from_default: bool = True) -> bool:
    """Set the current CUDA context's per-thread stack limit to ``nbytes``; False (and a log line) when
    there is no CUDA driver or context, or the driver refuses. Call it with the device's context current
    (after allocating on it) and before the first kernel launch.

    With ``only_from_default`` the limit is changed only while it is the driver's default: a limit the
    process set, or a kernel raised, stays (so loading a second model never shrinks it under the first)."""
    if nbytes < 0:
        raise ValueError(f"a stack limit is a size in bytes, not {nbytes}")
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        log.debug("no CUDA driver: stack limit left alone")
        return False
    current = ctypes.c_size_t()
    status = driver.cuCtxGetLimit(ctypes.byref(current), CU_LIMIT_STACK_SIZE)
    if status != 0:
        log.warning("cuCtxGetLimit(stack) failed with CUresult %d (no current context?); limit left alone", status)
        return False
    if only_from_default and current.value != DRIVER_DEFAULT_STACK_BYTES:
        log.info("CUDA stack limit is %d bytes, not the driver's default: left alone", current.value)
        return False
    status = driver.cuCtxSetLimit(CU_LIMIT_STACK_SIZE, ctypes.c_size_t(nbytes))
    if status != 0:
        log.warning("cuCtxSetLimit(stack, %d) failed with CUresult %d; the driver's limit stays", nbytes, status)
        return False
    log.info("CUDA stack limit: %d bytes per thread (was %d)", nbytes, current.value)
    return True

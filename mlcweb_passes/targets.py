"""What the passes need to know about a target's GPU, read from the target or the device.

Schedules and kernel generators size their work by the GPU: how many multiprocessors a grid should
fill, how much shared memory a block may take, how many threads it may have. :func:`gpu_facts` reads
each from the TVM target where it says (``max_num_threads``, ``max_shared_memory_per_block``) and from
the CUDA device of the build machine when it has one of the target's architecture. Building on a
machine without that GPU (cross-compiling), the multiprocessor count falls back to the one of the
architecture's reference part (:data:`REFERENCE_SM_COUNT`) and a log line says so; pass
``GpuFacts`` explicitly (``PipelineOptions.gpu``) to plan for another part. WebGPU tells a page
nothing about multiprocessors: a webgpu target plans for a desktop GPU of
:data:`WEBGPU_PLANNING_SMS` (split-K and grid sizes; a smaller GPU runs the same grid in more waves).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import tvm
from tvm.s_tir.dlight.gpu.matmul import check_sm_version
from tvm.target import Target

__all__ = [
    "GPU_KINDS",
    "REFERENCE_SM_COUNT",
    "WEBGPU_PLANNING_SMS",
    "GpuFacts",
    "async_copy_config",
    "gpu_facts",
    "is_gpu_target",
    "sm_version",
]

log = logging.getLogger(__name__)

GPU_KINDS = frozenset({"cuda", "rocm", "metal", "vulkan", "webgpu", "opencl"})

# Multiprocessors of each CUDA architecture's reference data-centre part, used only when the build
# machine has no such GPU to ask: sm_70 V100, sm_80 A100, sm_86 A10, sm_89 L4, sm_90 H100 SXM.
REFERENCE_SM_COUNT = {70: 80, 75: 40, 80: 108, 86: 72, 89: 58, 90: 132}
# Threads a multiprocessor holds at once (CUDA's "maximum resident threads per SM").
RESIDENT_THREADS_PER_SM = {70: 2048, 75: 1024, 80: 2048, 86: 1536, 89: 1536, 90: 2048}
# Dynamic shared memory one block may opt into, by architecture (CUDA programming guide); without the
# opt-in, 48 KiB.
OPT_IN_SHARED_BYTES = {70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

# WebGPU tells a page nothing about multiprocessors: schedules and rewrites that size their grid by the
# GPU plan for a desktop GPU of this many (a smaller GPU runs the same grid in more waves).
WEBGPU_PLANNING_SMS = 128
ASYNC_COPY_CONFIG = {"tirx.use_async_copy": True}


def is_gpu_target(target: Target) -> bool:
    return target.kind.name in GPU_KINDS


def sm_version(target: Target) -> int:
    """The SM version of a cuda target (90 for sm_90); -1 for other targets."""
    return check_sm_version(str(target.attrs.get("arch", ""))) if target.kind.name == "cuda" else -1


def async_copy_config(target: Target) -> dict[str, bool]:
    """The PassContext config to build ``target``'s tensor-core tiles with: asynchronous global-to-shared
    copies (``cp.async``) on cuda sm_80+, else nothing."""
    return dict(ASYNC_COPY_CONFIG) if sm_version(target) >= 80 else {}


@dataclass(frozen=True)
class GpuFacts:
    """The GPU a build plans for: ``sm_count`` multiprocessors holding ``resident_threads`` threads in all,
    blocks of at most ``max_threads`` threads and ``max_shared_bytes`` of dynamic shared memory."""

    sm_count: int
    max_threads: int
    max_shared_bytes: int
    threads_per_sm: int = 2048

    @property
    def resident_threads(self) -> int:
        return self.sm_count * self.threads_per_sm


def _nearest(table: dict[int, int], sm: int) -> int:
    """``table``'s value for the newest architecture not newer than ``sm`` (its oldest for older ones)."""
    known = [k for k in sorted(table) if k <= sm] or [min(table)]
    return table[known[-1]]


def _device_sm_count(sm: int) -> int | None:
    """The multiprocessors of this machine's first CUDA device when its architecture is ``sm``."""
    try:
        device = tvm.cuda(0)
        if not device.exist:
            return None
        major, minor = str(device.compute_version).split(".")
        if int(major) * 10 + int(minor) != sm:
            return None
        return int(device.multi_processor_count)
    except (tvm.error.TVMError, RuntimeError, ValueError):
        return None


def gpu_facts(target: Target) -> GpuFacts:
    """The facts of ``target``'s GPU (see the module docstring for where each comes from)."""
    threads = int(target.attrs.get("max_num_threads", 1024))
    sm = sm_version(target)
    if sm < 0:
        shared = int(target.attrs.get("max_shared_memory_per_block", 48 * 1024))
        if target.kind.name == "webgpu":  # no multiprocessor count in WebGPU: plan for a desktop GPU
            return GpuFacts(WEBGPU_PLANNING_SMS, threads, shared)
        return GpuFacts(sm_count=1, max_threads=threads, max_shared_bytes=shared)
    shared = int(target.attrs.get("max_shared_memory_per_block", _nearest(OPT_IN_SHARED_BYTES, sm)))
    count = _device_sm_count(sm)
    if count is None:
        count = _nearest(REFERENCE_SM_COUNT, sm)
        log.info("no sm_%d device on this machine: planning for %d multiprocessors (its reference part)", sm, count)
    return GpuFacts(count, threads, shared, _nearest(RESIDENT_THREADS_PER_SM, sm))

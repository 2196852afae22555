"""A GPU schedule rule (CUDA and WebGPU): GEMMs with a handful of rows, as one warp per output column.

The UNet's time embedding goes through a linear layer in every resnet (``time_emb_proj``): the batch's
two embedding rows times a 320-1280 x 1280 weight, 24 kernels per guided step. dlight's ``Matmul`` rule
pads the two rows to a 32-row tile and gives each thread block 64 output columns, so a 1280-column
GEMM gets 20 thread blocks, each walking the whole reduction 16 at a time, far from reading its 0.8-3.3
MB of weights at memory speed (``benchmarks/skinny_matmul.py`` measures both).

:class:`SkinnyMatmul` takes ``C[i, j] = sum_k A[i, k] * B[j, k]`` (weights stored ``[N, K]``, as after
:class:`~mlcweb_passes.LinearWeightLayout`) with at most ``max_rows`` rows and schedules it as a
batched GEMV:

- each warp computes all rows of one output column: its 32 lanes stride the reduction in 16-byte
  vectors of ``B``'s row (coalesced: a warp reads 512 contiguous bytes per step) and of each row of
  ``A``, and accumulate in float32 registers;
- the lanes' partial sums meet in a warp reduction (``rfactor`` and a cross-thread reduction), and the
  fused epilogue (casts, bias, activation) runs on the result in registers;
- a thread block holds ``warps`` warps, so an N-column GEMM launches N / ``warps`` blocks.

On WebGPU the same schedule takes float16 and float32 GEMMs, each lane reading 4-element vectors (WGSL's
widest; :class:`~mlcweb_passes.webgpu.vector_storage.WebGPUVectorStorage` declares such buffers as
``array<vec4<T>>``). A "warp" is the target's ``thread_warp_size`` invocations where the library is built
for subgroups (the lanes' sums meet in subgroup shuffles), else 32 invocations whose sums meet in
workgroup memory. dlight's ``Matmul`` rule gave the float16 UNet's 24 time-embedding GEMMs a step 16
workgroups of 32 columns at most, each walking the whole reduction with a barrier every 8 elements.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.gpu.matmul import get_reduction_blocks
from tvm.target import Target

from ..cuda.tensor_core_matmul import WARP, gemm_shape

__all__ = ["SkinnyMatmul"]


# per target kind: the input dtypes taken, and the elements each lane loads at once (16 bytes of float16
# in CUDA; WGSL's widest vector, 4, in WebGPU)
_DTYPES = {"cuda": ("float16",), "webgpu": ("float16", "float32")}
_VECTOR = {"cuda": 8, "webgpu": 4}


class SkinnyMatmul(dl.ScheduleRule):
    """Warp-per-column schedule for CUDA (float16) and WebGPU (float16, float32) GEMMs of at most
    ``max_rows`` rows whose inputs are stored with the reduction axis innermost and whose reduction is a
    multiple of the warp's width x the lanes' vector (see the module docstring)."""

    def __init__(self, max_rows: int = 8, warps: int = 4) -> None:
        self.max_rows = max_rows
        self.warps = warps

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        kind = target.kind.name
        if not isinstance(func, tirx.PrimFunc) or kind not in _DTYPES:
            return None
        sch = s_tir.Schedule(func)
        main = _gemm_block(sch, _DTYPES[kind])
        if main is None:
            return None
        shape = gemm_shape(sch.get(main))
        lanes, vector = _lanes(target), _VECTOR[kind]
        if lanes * self.warps > int(target.attrs.get("max_num_threads", 1024)):
            return None
        if shape is None or shape.m > self.max_rows or shape.n % self.warps != 0 or shape.k % (lanes * vector):
            return None
        try:
            return self._schedule(sch, main, lanes, vector)
        except (AssertionError, s_tir.ScheduleError):
            return None

    def _schedule(self, sch: s_tir.Schedule, main: s_tir.schedule.SBlockRV, lanes: int, vector: int) -> s_tir.Schedule:
        epilogue = _inline_epilogue(sch, main)
        i, j, k = sch.get_loops(main)
        j_block, j_warp = sch.split(j, [None, self.warps])
        k_outer, lane, vec = sch.split(k, [None, lanes, vector])
        sch.reorder(j_block, j_warp, lane, k_outer, i, vec)
        partial = sch.rfactor(lane, factor_axis=0)
        j_block, j_warp, lane, k_outer, _, _ = sch.get_loops(partial)
        sch.bind(j_block, "blockIdx.x")
        sch.bind(j_warp, "threadIdx.y")
        sch.bind(lane, "threadIdx.x")
        sch.set_scope(partial, 0, "local")
        # vector loads of B's row and A's rows, once per reduction step
        for index in (0, 1):
            cached = sch.cache_read(partial, index, "local")
            sch.compute_at(cached, k_outer)
            sch.vectorize(sch.get_loops(cached)[-1])
        _sum_across_lanes(sch, main, epilogue, j_warp, lanes)  # one cross-thread reduction per row
        sch.decompose_reduction(partial, k_outer)
        return sch


def _sum_across_lanes(
    sch: s_tir.Schedule,
    main: s_tir.schedule.SBlockRV,
    epilogue: s_tir.schedule.SBlockRV | None,
    warp: s_tir.schedule.LoopRV,
    lanes: int,
) -> None:
    """After ``rfactor`` over the lanes: ``main`` sums the lanes' partial sums of each of the warp's
    outputs across ``threadIdx.x``, in registers where an epilogue follows (else into the function's
    output), and the epilogue runs after it, both under the ``warp`` loop."""
    sch.reverse_compute_at(main, warp)
    outputs, across = sorted(sch.get_loops(main)[-2:], key=lambda loop: int(sch.get(loop).extent) == lanes)
    sch.reorder(outputs, across)
    sch.bind(across, "threadIdx.x")
    if epilogue is not None:
        sch.set_scope(main, 0, "local")
        sch.reverse_compute_at(epilogue, warp)


def _lanes(target: Target) -> int:
    """The invocations that share one output column: the target's warp (CUDA) or subgroup (a WebGPU
    library built for subgroups), else 32 that reduce through workgroup memory."""
    width = int(target.attrs.get("thread_warp_size", 1))
    return width if width > 1 else WARP


def _gemm_block(sch: s_tir.Schedule, dtypes: tuple[str, ...]) -> s_tir.schedule.SBlockRV | None:
    """The function's one reduction block when it is ``C[i, j] += A[i, k] * B[j, k]`` with its loops
    in that order, both inputs of one of ``dtypes`` and indexed by ``k`` innermost, else None."""
    blocks = get_reduction_blocks(sch, sch.get_child_blocks(sch.get_sblock("root")))
    if not blocks or len(blocks) != 1:
        return None
    if sch.get_producers(blocks[0]):  # inputs computed in the kernel: left to the general rules
        return None
    block = sch.get(blocks[0])
    if len(block.iter_vars) != 3 or len(block.reads) < 2:
        return None
    if any(str(r.source.dtype) not in dtypes for r in block.reads[:2]):  # loads sized per dtype and target
        return None
    i, j, k = (iv.var for iv in block.iter_vars)
    spatial, reduce = tirx.IterVar.DataPar, tirx.IterVar.CommReduce
    if [iv.iter_type for iv in block.iter_vars] != [spatial, spatial, reduce]:
        return None
    a, b = (r.region for r in block.reads[:2])
    if [len(a), len(b)] != [2, 2] or not (a[0].min.same_as(i) and a[1].min.same_as(k)):
        return None
    if not (b[0].min.same_as(j) and b[1].min.same_as(k)):
        return None
    return blocks[0]


def _inline_epilogue(sch: s_tir.Schedule, main: s_tir.schedule.SBlockRV) -> s_tir.schedule.SBlockRV | None:
    """Inline the elementwise blocks after ``main`` into the last one; that block, or None."""
    consumers = sch.get_consumers(main)
    if not consumers:
        return None
    last = consumers[0]
    while True:
        following = sch.get_consumers(last)
        if not following:
            return last
        sch.compute_inline(last)
        last = following[0]

"""A GPU schedule rule (CUDA, WebGPU) for group norm over channels-last (NHWC) activations.

In NHWC a group's elements are ``C/G`` contiguous channels (10 in SD's 320-channel UNet levels, 4 in the
VAE's 128-channel ones) of every pixel. :class:`~mlcweb_passes.row_reduction.RowReduction` gives each of
the ``batch x groups`` rows one thread block: 64 blocks for the guided UNet and 32 for the VAE, fewer than
a Hopper GPU has multiprocessors, each reading 20- or 8-byte pieces 640 or 256 bytes apart: several
times slower than reading the activations twice (``benchmarks/group_norm.py``).

:class:`ChannelsLastNorm` splits the pixels instead, in three kernels of one PrimFunc:

1. **partial sums**: the reduction is ``rfactor``-ed over (pixel chunk, channel in group). A thread block
   takes ``ty`` chunks of ``pixels`` pixels of one image; its threads stride the channels ``vector`` at a
   time, so a warp reads contiguous memory, and each thread keeps one float32 partial per channel in
   registers. Partials go to a small global buffer laid out ``[chunk, batch, channel]``;
2. **totals**: one thread block per (image, group) sums the chunks' partials with a cross-thread
   reduction;
3. **normalise** and the fused epilogue (activation, casts): a thread per ``vector`` channels of a pixel.

Where a pixel's channels need more threads than a block holds (WebGPU's 256 against the 320 and 480
channel pairs of SD's 640- and 960-channel levels at 64x64), they are cut into ``runs``: each partial-sum
block takes ``1 / runs`` of the groups, and each normalising thread ``runs`` pieces ``C / runs`` apart.

It takes functions with one reduction whose loops are (batch..., group | pixels..., channel in group),
whose one input is indexed ``[..., group * C/G + channel]`` in its last axis, with at least
``min_pixels`` pixels, and only elementwise blocks besides. Everything else falls through to the next
rule (``RowReduction``).
"""

from __future__ import annotations

from functools import reduce

from tvm import s_tir, sym, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from .._tir import one_reduction
from ..targets import GpuFacts

__all__ = ["ChannelsLastNorm"]


class ChannelsLastNorm(dl.ScheduleRule):
    """Pixel-split group norm for channels-last activations on CUDA and WebGPU (see the module docstring); the
    partial-sum kernel aims to fill ``gpu``'s resident threads."""

    def __init__(
        self,
        gpu: GpuFacts,
        min_pixels: int = 4096,
        pixels: int = 32,
        vector: int = 2,
        threads: int = 256,
        unroll: int = 8,
    ) -> None:
        self.gpu = gpu
        self.min_pixels = min_pixels
        self.pixels = pixels  # the fewest pixels per thread of the partial-sum kernel
        self.vector = vector  # channels per thread and load: 2 float16 = one 4-byte load
        self.threads = threads
        self.unroll = unroll

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name not in ("cuda", "webgpu"):
            return None
        found = one_reduction(func)
        if found is None:
            return None
        sch, infos, red = found
        shape = _channels_last(sch, red)
        if shape is None:
            return None
        n_batch, batch, pixels, channels, group_size = shape
        # A thread's channels stay inside one group (10 channels in SD's 320-channel levels: 2 divides it,
        # 4 does not), so the normalising kernel reads one group's statistics per thread.
        vector = self.vector if group_size % self.vector == 0 else 1
        # Channels wider than the target's threads (WebGPU's 256 against SD's 640- and 960-channel
        # levels) are cut into `runs` of `tx` threads: a partial-sum block per run of groups, each
        # normalising thread `vector` channels of every run.
        runs = _runs(channels // vector, self.gpu.max_threads)
        if pixels < self.min_pixels or runs is None:
            return None
        tx = channels // vector // runs
        per_thread = self.pixels
        while per_thread * 2 <= pixels and batch * pixels * tx // per_thread > self.gpu.resident_threads:
            per_thread *= 2
        if pixels % per_thread != 0 or per_thread % self.unroll != 0:
            return None
        chunks = pixels // per_thread
        ty = 1
        while tx * ty * 2 <= self.threads and chunks % (ty * 2) == 0:
            ty *= 2
        try:
            self._partials(sch, red.block_rv, n_batch, chunks, group_size, vector, runs, ty)
            self._totals(sch, red.block_rv)
        except s_tir.ScheduleError:
            return None
        for info in infos:
            if info is not red:
                self._elementwise(sch, info.block_rv, channels, vector, runs)
        return sch

    def _partials(
        self,
        sch: s_tir.Schedule,
        block: s_tir.schedule.SBlockRV,
        n_batch: int,
        chunks: int,
        group_size: int,
        vector: int,
        runs: int,
        ty: int,
    ) -> None:
        """rfactor the reduction over (chunk, channel in group) and schedule the partial-sum kernel: with
        ``runs`` > 1 a thread block takes ``1 / runs`` of the groups (their channels contiguous)."""
        loops = sch.get_loops(block)
        pixel_loops, channel = loops[n_batch + 1 : -1], loops[-1]
        pixel = sch.fuse(*pixel_loops) if len(pixel_loops) > 1 else pixel_loops[0]
        chunk, inner = sch.split(pixel, factors=[chunks, None])
        sch.reorder(chunk, channel, inner)
        rf = sch.rfactor(sch.fuse(chunk, channel), factor_axis=0)
        # Partials indexed [chunk, batch..., group * C/G + channel]: a thread's `vector` channels are
        # adjacent, so its registers and its final store are plain vectors.
        for i, region in enumerate(sch.get(rf).writes):
            sch.transform_layout(
                rf,
                ("write", i),
                tirx.IndexMap.from_func(
                    lambda *v: [v[0] // group_size, *v[1:-1], v[-1] * group_size + v[0] % group_size],
                    ndim=len(region.source.shape),
                ),
            )
        rf_loops = sch.get_loops(rf)
        batch, group, q, inner = rf_loops[:n_batch], rf_loops[n_batch], rf_loops[n_batch + 1], rf_loops[-1]
        chunk, channel = sch.split(q, factors=[chunks, group_size])
        chunk_o, chunk_i = sch.split(chunk, factors=[None, ty])
        run, group = sch.split(group, factors=[runs, None])
        sch.reorder(*batch, run, chunk_o, chunk_i, group, channel, inner)
        lanes, vec = sch.split(sch.fuse(group, channel), factors=[None, vector])
        step, unrolled = sch.split(inner, factors=[None, self.unroll])
        sch.reorder(step, unrolled, vec)
        sch.bind(sch.fuse(*batch, run, chunk_o), "blockIdx.x")
        sch.bind(chunk_i, "threadIdx.y")
        sch.bind(lanes, "threadIdx.x")
        sch.unroll(unrolled)
        sch.vectorize(vec)
        caches = [sch.cache_write(rf, i, "local") for i in range(len(sch.get(rf).writes))]
        for cache in caches:
            sch.reverse_compute_at(cache, lanes)
        sch.decompose_reduction(rf, step)

    def _elementwise(
        self, sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, channels: int, vector: int, runs: int
    ) -> None:
        """A thread per ``runs`` x ``vector`` channels of a pixel (runs ``channels / runs`` apart): one load
        and store of each input and output a run, and
        the group of the statistics read a thread-invariant index. Blocks of another shape: a thread per
        element."""
        loops = sch.get_loops(block)
        extents = [sch.get(lp).extent for lp in loops]
        if len(loops) < 2 or not all(isinstance(e, tirx.IntImm) for e in extents) or int(extents[-1]) != channels:
            fused = sch.fuse(*loops)
            bx, t = sch.split(fused, factors=[None, self.threads])
            sch.bind(bx, "blockIdx.x")
            sch.bind(t, "threadIdx.x")
            return
        pixels = reduce(lambda a, b: a * b, (int(e) for e in extents[:-1]), 1)
        lanes, vec = sch.split(loops[-1], factors=[None, vector])
        run, lanes = sch.split(lanes, factors=[runs, None])
        ty = 1
        while channels // vector // runs * ty * 2 <= self.threads and pixels % (ty * 2) == 0:
            ty *= 2
        bx, t = sch.split(sch.fuse(*loops[:-1]), factors=[None, ty])
        sch.reorder(lanes, run)
        sch.bind(bx, "blockIdx.x")
        sch.bind(t, "threadIdx.y")
        sch.bind(lanes, "threadIdx.x")
        sch.unroll(run)
        sch.vectorize(vec)

    def _totals(self, sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> None:
        """One thread block per (batch, group) sums the partials across threads."""
        *rows, q = sch.get_loops(block)
        row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
        outer, lane = sch.split(q, factors=[None, self.threads])
        sch.reorder(row, lane, outer)
        sch.bind(row, "blockIdx.x")
        sch.bind(lane, "threadIdx.x")


def _runs(lanes: int, max_threads: int) -> int | None:
    """The fewest runs (at most 8, a divisor of ``lanes``) that cut ``lanes`` threads' worth of channels
    into runs of at most ``max_threads``, or None (thousands of channels: not a group norm this rule
    serves)."""
    for runs in range(1, min(lanes, 8) + 1):
        if lanes % runs == 0 and lanes // runs <= max_threads:
            return runs
    return None


def _channels_last(sch: s_tir.Schedule, red: dl.SBlockInfo) -> tuple[int, int, int, int, int] | None:
    """(batch loops, batch, pixels, channels, channels per group) when ``red`` is a channels-last group reduction:
    loops S...S R...R with at least one pixel loop, constant extents, and one input whose last index is
    ``group * C/G + channel`` (the last spatial and the last reduction variable)."""
    block = sch.get(red.block_rv)
    kinds = red.dom_kind()
    loops = sch.get_loops(red.block_rv)
    n_s = len(kinds) - len(kinds.lstrip("S"))
    if kinds != "S" * n_s + "R" * (len(kinds) - n_s) or n_s == 0 or len(kinds) - n_s < 2:
        return None
    if len(loops) != len(kinds) or len(block.iter_vars) != len(kinds):
        return None
    extents = [sch.get(lp).extent for lp in loops]
    if not all(isinstance(e, tirx.IntImm) for e in extents):
        return None
    sizes = [int(e.value) for e in extents]
    inputs = {r.source for r in block.reads} - {w.source for w in block.writes}
    if len(inputs) != 1:
        return None
    (source,) = inputs
    group, channel = block.iter_vars[n_s - 1].var, block.iter_vars[-1].var
    group_size = sizes[-1]
    channels = sizes[n_s - 1] * group_size
    analyzer = sym.Analyzer()
    for region in block.reads:
        if not region.source.same_as(source) or not region.region:
            continue
        last = region.region[-1]
        if int(source.shape[-1]) != channels or not analyzer.can_prove_equal(last.min, group * group_size + channel):
            return None
    batch = reduce(lambda a, b: a * b, sizes[: n_s - 1], 1)
    pixels = reduce(lambda a, b: a * b, sizes[n_s:-1], 1)
    return n_s - 1, batch, pixels, channels, group_size

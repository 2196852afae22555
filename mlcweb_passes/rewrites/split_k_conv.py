"""Split-K convolution: a convolution whose implicit GEMM has too few output tiles to fill the GPU
splits its reduction over the input channels into independent GEMMs, and one elementwise kernel sums
them.

A GEMM kernel gives each thread block one output tile and walks the whole reduction in it. Stable
Diffusion's deepest convolutions have few output rows and a long reduction: at 8x8 latents (batch 2
for guidance) a 3x3 convolution of 1280 channels is 128 rows x 1280 columns over 11,520 (3 x 3 x 1280)
products. That is 40 tiles of 64x64, a third of a Hopper GPU's multiprocessors, each stepping through
11,520 products alone while the rest of the chip idles.

The pass rewrites such a float16 ``conv2d`` (float16 or float32 on WebGPU; NHWC data, OHWI kernel, after
:class:`~mlcweb_passes.ConvLayout`) into

1. ``partial[s, n, h, w, o]``: the convolution over the ``s``-th of ``splits`` slices of input channels,
   accumulated in float32. The input and kernel are viewed as ``[..., splits, channels / splits]``
   (reshapes, no copy), so the slice is a batch axis of the GEMM:
   :class:`~mlcweb_passes.TensorCoreMatmul` (on WebGPU ``WebGPUMatmul``) tiles it like any batched
   GEMM, ``splits`` times as many blocks, each over a reduction ``splits`` times shorter. The PrimFunc
   is marked opaque, so fusion does not merge the sum into it;
2. ``sum_s partial[s]`` in the convolution's output dtype: an elementwise kernel, into which fusion
   folds whatever followed the convolution (bias, residual adds, casts).

The float32 partial sums are written once and read once (10 MiB for 512 x 1280 outputs in 4 splits),
which costs far less than the idle multiprocessors. Only the order of the float32 additions changes.

:func:`choose_splits` picks the number of slices from the GEMM shape and the multiprocessor count, by a
:class:`SplitPolicy` (its defaults measured for CUDA's tensor-core tiles; the WebGPU pipeline gives its
own for the subgroup-matrix tiles).
"""

from __future__ import annotations

import functools
import logging
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import tvm
from tvm import relax, te, topi
from tvm.relax.expr_functor import PyExprMutator, mutator

from .._relax import ModulePassBase, op_name, rewrite_and_clean, static_shape
from ..targets import gpu_facts
from ..webgpu.widen_gemm_operands import widened

__all__ = ["SplitKConv", "SplitPolicy", "choose_splits", "webgpu_split_policy"]

log = logging.getLogger(__name__)

OPAQUE = 8  # relay / relax OpPatternKind.kOpaque: FuseOps merges nothing into the kernel
LARGE_TILE = 128  # TensorCoreMatmul's large output tile edge: a wave of these needs no split
SLICE_ALIGN = 64  # channels per slice: a multiple of the tiles' deepest reduction step
MIN_SLICE_REDUCTION = 2880  # products per output in one slice (3 x 3 x 320)
VECTOR = 8  # with a fixed split count, channels per slice must still be whole 16-byte float16 vectors


@dataclass(frozen=True)
class SplitPolicy:
    """When and how finely :func:`choose_splits` splits: a convolution whose output makes fewer than
    ``waves`` x the multiprocessors of ``tile`` (rows x columns) output tiles is split into the most
    slices that keep each slice a multiple of :data:`SLICE_ALIGN` channels and its reduction (window x
    channels) at least ``min_slice`` long. The defaults are CUDA's (``benchmarks/split_k.py`` on an
    H100, SD1.5's UNet): 128x128 tiles, one wave, 2880 products (3 x 3 x 320)."""

    tile: tuple[int, int] = (LARGE_TILE, LARGE_TILE)
    waves: float = 1.0
    min_slice: int = MIN_SLICE_REDUCTION

    def __post_init__(self) -> None:
        if min(self.tile) < 1 or self.waves <= 0 or self.min_slice < 1:
            raise ValueError(f"a split policy needs positive tile edges, waves and slice length, not {self}")


# WebGPU's subgroup-matrix GEMMs (64x128 tiles, 32 deep, no asynchronous copies) need more workgroups to
# hide their loads than CUDA's: two waves, slices of 128 channels of a 3x3 window. On an H100 through Dawn,
# SD1.5's UNet convolutions went from 16.9 to 13.8 ms a step (split sums 0.42 -> 0.55) against CUDA's
# policy (benchmarks/results/2026-12-07-h100-sd_webgpu-12.md).
WEBGPU_WAVES = 2.0
WEBGPU_MIN_SLICE = 1152


def webgpu_split_policy(tile: tuple[int, int]) -> SplitPolicy:
    """The split policy for WebGPU GEMMs of ``tile`` (rows x columns) output tiles."""
    return SplitPolicy(tile, WEBGPU_WAVES, WEBGPU_MIN_SLICE)


def choose_splits(
    rows: int, cols: int, channels: int, window: int, sms: int, policy: SplitPolicy = SplitPolicy()
) -> int:
    """How many slices to split a convolution's input ``channels`` into, for an output of ``rows x cols``
    and a kernel ``window`` (``kh * kw``) on a GPU of ``sms`` multiprocessors.

    1 when the output already makes ``policy.waves`` waves of ``policy.tile`` tiles. Otherwise the most
    slices that keep each slice a multiple of :data:`SLICE_ALIGN` channels and its reduction (``window``
    x channels) at least ``policy.min_slice`` long: a slice whose channels are not a multiple of the
    64-deep reduction step straddles kernel positions and runs several times slower; on CUDA shorter
    slices than the default gained nothing more.
    """
    tiles = math.ceil(rows / policy.tile[0]) * math.ceil(cols / policy.tile[1])
    if tiles >= policy.waves * sms:
        return 1
    best = 1
    for splits in range(2, channels // SLICE_ALIGN + 1):
        if channels % (splits * SLICE_ALIGN):
            continue
        if window * channels // splits < policy.min_slice:
            break
        best = splits
    return best


def _partials(
    x: te.Tensor,
    w: te.Tensor,
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    out_hw: Sequence[int],
    widen: bool = False,
) -> te.Tensor:
    """``partial[s, n, h, w, o]``: the convolution of ``x[n, h, w, s, c]`` with ``w[o, kh, kw, s, c]``
    over the kernel window and ``c``, in float32; with ``widen``, both operands are cast to float32 in
    producer stages (what :class:`~mlcweb_passes.webgpu.widen_gemm_operands.WidenGemmOperands` does
    for the other GEMMs: a WebGPU schedule then converts each element once per workgroup copy)."""
    if widen:
        x, w = widened(x), widened(w)
    top, left, bottom, right = padding
    padded = topi.nn.pad(x, [0, top, left, 0, 0], [0, bottom, right, 0, 0]) if any(padding) else x
    _, kh, kw, splits, channels = w.shape
    rh = te.reduce_axis((0, kh), name="rh")
    rw = te.reduce_axis((0, kw), name="rw")
    rc = te.reduce_axis((0, channels), name="rc")
    (sh, sw), (dh, dw) = strides, dilation
    return te.compute(
        (splits, x.shape[0], *out_hw, w.shape[0]),
        lambda s, n, i, j, o: te.sum(
            padded[n, i * sh + rh * dh, j * sw + rw * dw, s, rc].astype("float32")
            * w[o, rh, rw, s, rc].astype("float32"),
            axis=[rh, rw, rc],
        ),
        name="conv2d_split_k",
    )


def _sum_splits(partial: te.Tensor, out_dtype: str) -> te.Tensor:
    """``sum_s partial[s]`` as explicit additions (an elementwise kernel, not a reduction), cast."""
    splits = int(partial.shape[0])
    return te.compute(
        partial.shape[1:],
        lambda *i: functools.reduce(operator.add, [partial[(s, *i)] for s in range(splits)]).astype(out_dtype),
        name="split_k_sum",
    )


@mutator
class _Rewriter(PyExprMutator):
    def __init__(
        self,
        mod: tvm.IRModule,
        splits: int | None,
        sms: int,
        dtypes: tuple[str, ...],
        widen: bool,
        policy: SplitPolicy,
    ) -> None:
        super().__init__(mod)
        self.splits = splits
        self.policy = policy
        self.sms = sms
        self.dtypes = dtypes
        self.widen = widen
        self.rewritten: list[int] = []

    def _split_count(self, call: relax.Call, x_shape: list[int], w_shape: list[int], out_shape: list[int]) -> int:
        """The slices for ``call``; 1 (leave it) for convolutions the pass does not take."""
        attrs = call.attrs
        if (
            int(attrs.groups) != 1
            or str(attrs.data_layout) != "NHWC"
            or str(attrs.kernel_layout) != "OHWI"
            or str(attrs.out_layout) != "NHWC"
            or any(str(a.ty.dtype) not in self.dtypes for a in call.args)
            or len({str(a.ty.dtype) for a in call.args}) != 1
        ):
            return 1
        channels = x_shape[3]
        if self.splits is not None:
            return self.splits if channels % (self.splits * VECTOR) == 0 else 1
        rows = out_shape[0] * out_shape[1] * out_shape[2]
        return choose_splits(rows, out_shape[3], channels, w_shape[1] * w_shape[2], self.sms, self.policy)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if op_name(call) != "relax.nn.conv2d":
            return super().visit_call_(call)
        x_shape, w_shape, out_shape = (static_shape(e.ty.shape) for e in (call.args[0], call.args[1], call))
        if x_shape is None or w_shape is None or out_shape is None:
            return super().visit_call_(call)
        splits = self._split_count(call, x_shape, w_shape, out_shape)
        if splits <= 1:
            return super().visit_call_(call)
        x, w = (self.visit_expr(a) for a in call.args)
        n, h, wd, c = x_shape
        o, kh, kw, _ = w_shape
        _, oh, ow, _ = out_shape
        attrs = call.attrs
        x5 = self.builder_.emit(relax.op.reshape(x, [n, h, wd, splits, c // splits]))
        w5 = self.builder_.emit(relax.op.reshape(w, [o, kh, kw, splits, c // splits]))
        dtype = str(call.args[0].ty.dtype)
        x_te = te.placeholder((n, h, wd, splits, c // splits), dtype, name="x")
        w_te = te.placeholder((o, kh, kw, splits, c // splits), dtype, name="w")
        partial = _partials(
            x_te,
            w_te,
            [int(v) for v in attrs.strides],
            [int(v) for v in attrs.padding],
            [int(v) for v in attrs.dilation],
            (oh, ow),
            widen=self.widen and dtype == "float16",
        )
        func = te.create_prim_func([x_te, w_te, partial]).without_attr("global_symbol").with_attr("op_pattern", OPAQUE)
        gv = self.builder_.add_func(func, "conv2d_split_k")
        out_sinfo = relax.TensorType((splits, n, oh, ow, o), "float32")
        partial_var = self.builder_.emit(relax.call_tir(gv, [x5, w5], out_sinfo))
        out_dtype = str(call.ty.dtype)  # the convolution's result, whether or not out_dtype was given
        self.rewritten.append(splits)
        return self.builder_.call_te(_sum_splits, partial_var, out_dtype, primfunc_name_hint="split_k_sum")


@tvm.transform.module_pass(opt_level=0, name="mlcweb.SplitKConv")
class SplitKConv(ModulePassBase):
    """Split the reduction of NHWC convolutions with few output tiles (see the module docstring).

    ``dtypes``: the convolutions' dtypes it takes (float16 on CUDA, where the tiles are tensor cores;
    the WebGPU pipeline passes float32 too). ``splits`` fixes the slice count for every convolution
    whose channels divide into it (benchmarks, tests); by default :func:`choose_splits` picks one per
    shape for ``sm_count`` multiprocessors (the current target's
    :func:`~mlcweb_passes.targets.gpu_facts` when not given) and ``policy`` (default: CUDA's
    :class:`SplitPolicy`). ``widen``: float16 partial GEMMs cast their operands to float32 in producer
    stages (WebGPU; see :func:`_partials`).
    """

    def __init__(
        self,
        splits: int | None = None,
        sm_count: int | None = None,
        dtypes: Sequence[str] = ("float16",),
        widen: bool = False,
        policy: SplitPolicy | None = None,
    ) -> None:
        if splits is not None and splits < 1:
            raise ValueError(f"splits must be at least 1, not {splits}")
        self.splits = splits
        self.sm_count = sm_count
        self.dtypes = tuple(dtypes)
        self.widen = widen
        self.policy = policy or SplitPolicy()

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        sms = self.sm_count
        if sms is None and self.splits is None:
            sms = gpu_facts(tvm.target.Target.current(allow_none=False)).sm_count
        rewriter = _Rewriter(mod, self.splits, sms or 1, self.dtypes, self.widen, self.policy)
        result = rewrite_and_clean(mod, rewriter)
        if rewriter.rewritten:
            log.info("%d convolutions split their reduction (%s slices)", len(rewriter.rewritten), rewriter.rewritten)
        return result

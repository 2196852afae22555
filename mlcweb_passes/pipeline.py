"""The mlcweb compilation pipeline: every pass of this package in the order a build needs.

``pipeline(target)`` returns one ``tvm.transform.Pass`` that takes an imported Relax module to a module
the Relax VM can run, and can be handed to TVM directly::

    exe = tvm.compile(mod, target, relax_pipeline=mlcweb_passes.pipeline(target, database="db/"))

Order (each step is a module of this package):

1. ``MixedPrecision`` (only with ``mixed_precision=...``): float16 compute, chosen accumulators.
   ``DropSoftmaxGuard``: torch's all-``-inf``-row guard after softmax goes where scores are finite.
2. ``Int32Tensors`` and ``FiniteFloatLiterals`` (WebGPU only): integer tensors WGSL lacks become
   int32, and infinite constants, which WGSL cannot spell, finite ones.
3. TVM's library dispatch for the target (sort / scan / sampling kernels).
   ``FlashAttention`` (CUDA sm_80+, on by default): each float16 attention over head transposes becomes
   one flash-attention kernel on tensor cores; no score matrix is stored.
   ``SplitKConv`` (CUDA sm_70+, on by default): float16 convolutions with too few output tiles to fill
   the GPU split their reduction into a batch of GEMMs and a sum.
4. ``FuseAttention`` (off by default: no schedule rule handles the fused kernel well yet; on the CPU
   the tiny UNet runs 156 ms fused vs 97 ms unfused): attention patterns become one composite each.
   ``FuseSoftmax``: the casts around each remaining softmax join it in one kernel.
   ``HoistNarrowingCasts``: float-narrowing casts move above reshapes and transposes into their
   producers' epilogues, widen-then-narrow round trips and same-shape broadcasts go (exact).
   ``EliminateCommonSubexpr``: repeated computations (casts of one input) are computed once.
5. ``FuseOperators``: legalize to TIR, fuse elementwise chains, merge composites into one PrimFunc.
   ``WgmmaGemm`` (CUDA sm_90, on by default): each fused float16 GEMM (linear or convolution and its
   epilogue) becomes a launch of a generated Hopper ``wgmma`` kernel, attached as an external module.
6. ``ApplyDatabase``: tuned schedules from ``database`` where recorded, default schedules elsewhere.
   ``LiftKernelScratch``: the global buffers a schedule passes between the kernels of one PrimFunc
   become extra ``call_tir`` outputs, so CUDA graphs capture planned memory, not the workspace pool's.
7. ``StaticMemoryPlan``: explicit allocations, planned statically (``memory_report`` reads it).
8. TVM's VM finalisation (``RewriteCUDAGraph`` where enabled, ``LowerAllocTensor``, ``KillAfterLastUse``,
   ``LowerRuntimeBuiltin``, ``ComputePrimValue``, ``VMShapeLower``, ``AttachGlobalSymbol``).

Weight lifting (:func:`~mlcweb_passes.split_transform_params`) is not part of it: it changes the
function signatures, so it runs before, on the imported module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from .apply_database import ApplyDatabase
from .drop_softmax_guard import DropSoftmaxGuard
from .finite_literals import FiniteFloatLiterals
from .flash_attention import FlashAttention, supports_flash_attention
from .fuse_attention import FuseAttention
from .fuse_ops import FuseOperators
from .fuse_softmax import FuseSoftmax
from .hoist_narrowing_casts import HoistNarrowingCasts
from .int32_tensors import Int32Tensors
from .lift_kernel_scratch import LiftKernelScratch
from .memory_plan import StaticMemoryPlan
from .mixed_precision import MixedPrecision
from .split_k_conv import SplitKConv
from .tensor_core_matmul import sm_version
from .wgmma_gemm import WgmmaGemm, supports_wgmma

__all__ = ["PipelineOptions", "lowering_passes", "pipeline"]


@dataclass(frozen=True)
class PipelineOptions:
    """Switches of :func:`pipeline`.

    ``mixed_precision``: ``None`` keeps the module's dtypes, ``"float32"`` or ``"float16"`` converts
    compute to float16 with that accumulator. ``fuse_attention``: run attention pattern fusion (one
    kernel per attention, for a flash-attention schedule; off by default). ``flash_attention``: replace
    float16 attention with :func:`~mlcweb_passes.flash_attention.flash_attention_kernel` on targets that
    support it (:func:`~mlcweb_passes.flash_attention.supports_flash_attention`).
    ``split_k``: split the reduction of float16 convolutions with few output tiles
    (:class:`~mlcweb_passes.SplitKConv`) on targets whose GEMMs run on tensor cores (CUDA sm_70+).
    ``extra_passes``: run after fusion and before scheduling (a plugin's rewrites of fused TIR).
    ``wgmma``: run float16 GEMMs as Hopper wgmma kernels (:class:`~mlcweb_passes.WgmmaGemm`) on CUDA sm_90.
    """

    mixed_precision: str | None = None
    fuse_attention: bool = False
    extra_passes: Sequence[tvm.transform.Pass] = field(default_factory=tuple)
    flash_attention: bool = True
    split_k: bool = True
    wgmma: bool = True


def lowering_passes(
    target: Target,
    database: ms.Database | str | os.PathLike[str] | None = None,
    options: PipelineOptions | None = None,
) -> list[tvm.transform.Pass]:
    """The passes of :func:`pipeline` as a list, for callers that want to insert their own."""
    opts = options or PipelineOptions()
    passes: list[tvm.transform.Pass] = []
    if opts.mixed_precision is not None:
        passes.append(MixedPrecision(opts.mixed_precision))
    passes.append(DropSoftmaxGuard())
    if target.kind.name == "webgpu":
        passes.extend([Int32Tensors(), FiniteFloatLiterals()])
    passes.extend(_library_dispatch(target))
    if opts.flash_attention and supports_flash_attention(target):
        passes.append(FlashAttention())
    if opts.split_k and sm_version(target) >= 70:
        # counted for the WMMA tiles: the wgmma count won per convolution but not measurably in the
        # whole model (benchmarks/README.md, runs 29-30), so it stays opt-in (SplitKConv(wgmma=True))
        passes.append(SplitKConv())
    if opts.fuse_attention:
        passes.append(FuseAttention())
    passes.append(FuseSoftmax())
    passes.append(HoistNarrowingCasts())
    # One copy of repeated work, e.g. the text embeddings' cast for each cross-attention's K and V: a kernel
    # that reads a function input runs outside CUDA graphs, so 32 copies split the UNet's graph in 33.
    passes.append(relax.transform.EliminateCommonSubexpr())
    passes.append(FuseOperators())
    passes.extend(opts.extra_passes)
    if opts.wgmma and supports_wgmma(target):
        passes.append(WgmmaGemm())
    passes.append(ApplyDatabase(target, database))
    # Kernels' global scratch as planned tensors: CUDA graphs capture addresses, which the runtime's
    # workspace pool may free and reallocate between calls.
    passes.append(LiftKernelScratch())
    passes.append(StaticMemoryPlan())
    passes.extend(
        [
            relax.transform.RewriteCUDAGraph(),
            relax.transform.LowerAllocTensor(),
            relax.transform.KillAfterLastUse(),
            relax.transform.LowerRuntimeBuiltin(),
            relax.transform.ComputePrimValue(),
            relax.transform.VMShapeLower(),
            relax.transform.AttachGlobalSymbol(),
        ]
    )
    return passes


def pipeline(
    target: Target | str | dict[str, object],
    database: ms.Database | str | os.PathLike[str] | None = None,
    *,
    mixed_precision: str | None = None,
    fuse_attention: bool = False,
    extra_passes: Sequence[tvm.transform.Pass] = (),
    flash_attention: bool = True,
    split_k: bool = True,
    wgmma: bool = True,
) -> tvm.transform.Pass:
    """One pass that compiles an imported Relax module for ``target`` (see the module docstring)."""
    tgt = target if isinstance(target, Target) else Target(target)
    options = PipelineOptions(mixed_precision, fuse_attention, tuple(extra_passes), flash_attention, split_k, wgmma)
    passes = lowering_passes(tgt, database, options)

    @tvm.transform.module_pass(opt_level=0, name="mlcweb.pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with tgt:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def _library_dispatch(target: Target) -> list[tvm.transform.Pass]:
    try:
        return list(relax.pipeline.library_dispatch_passes(target))
    except ValueError:
        return []

"""The mlcweb compilation pipeline, in named phases you can compose, print and replace.

Each phase is a ``tvm.transform.Sequential`` of this package's passes (and TVM's), decided for one
target and one :class:`PipelineOptions`; :data:`PHASES` is their order::

    weights   before weight lifting: precision and layouts change how weights are stored, so the change
              is computed once, on the weights (casts, transposes, reshapes, splits)
    graph     Relax rewrites: softmax guard, gathers kept in bounds, WGSL legalisation, library dispatch,
              flash attention
    fuse      operator fusion into PrimFuncs (and the casts around softmax, common subexpressions)
    kernels   target kernel generators that replace fused PrimFuncs (Hopper wgmma GEMMs)
    schedule  tuned schedules from a database, default rules elsewhere; kernel scratch as tensors
    memory    static memory planning
    finalize  TVM's VM lowering (CUDA graphs where enabled)

Compile a module in one call (weights stay arguments)::

    exe = tvm.compile(mod, target, relax_pipeline=mlcweb_passes.pipeline(target),
                      tir_pipeline=mlcweb_passes.tir_pipeline(target))

or lift the weights between the ``weights`` phase and the rest, as ``mlcweb build`` does::

    phases = mlcweb_passes.phases(target, options)
    mod = phases["weights"](mod)                        # under ``with target:``
    lifted = mlcweb_passes.split_transform_params(mod)
    exe = tvm.compile(lifted.deploy, target, relax_pipeline=mlcweb_passes.pipeline(target, options, after="weights"),
                      tir_pipeline=mlcweb_passes.tir_pipeline(target, options))

``extra`` adds a caller's passes to a phase (a model plugin's rewrites): in ``weights`` they run after
the layout passes and before the target's splitting of convolutions; in every other phase, at its end.
``python -m mlcweb_passes --target cuda`` prints the phases for a target.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from .cuda.flash_attention import FlashAttention
from .cuda.flash_kernel import supports_flash_attention
from .cuda.wgmma_gemm import WgmmaGemm, supports_wgmma
from .rewrites.cancel_transposes import CancelTransposes
from .rewrites.chunk_attention import ChunkAttentionRows
from .rewrites.clamp_gather_indices import ClampGatherIndices
from .rewrites.conv_layout import ConvLayout
from .rewrites.drop_softmax_guard import DropSoftmaxGuard
from .rewrites.finite_literals import FiniteFloatLiterals
from .rewrites.fold_bool_identities import FoldBoolIdentities
from .rewrites.fold_linear_reshapes import FoldLinearReshapes
from .rewrites.fold_pad_into_conv import FoldPadIntoConv
from .rewrites.fuse_ops import FuseOperators
from .rewrites.fuse_softmax import FuseSoftmax
from .rewrites.hoist_narrowing_casts import HoistNarrowingCasts
from .rewrites.int32_tensors import Int32Tensors
from .rewrites.integer_cumsum import IntegerCumsum
from .rewrites.lift_kernel_scratch import LiftKernelScratch
from .rewrites.linear_weight_layout import LinearWeightLayout
from .rewrites.memory_plan import StaticMemoryPlan
from .rewrites.mixed_precision import MixedPrecision
from .rewrites.split_k_conv import SplitKConv, SplitPolicy, webgpu_split_policy
from .schedules.apply_database import ApplyDatabase
from .targets import GpuFacts, gpu_facts, is_gpu_target, sm_version
from .webgpu import vector_storage
from .webgpu.flash_attention import WebGPUFlashTile, fits_webgpu_flash_attention, webgpu_flash_attention_kernel
from .webgpu.gemm import TILE_TABLE_FILE, WebGPUTile, read_tile_table
from .webgpu.matrix_attention import PlanMatrixAttention
from .webgpu.matrix_gemm import TILE_ORDER, MatrixConfig, MatrixTile, PlanMatrixGemms, plans_attr, workgroup_limit
from .webgpu.matrix_tiles import matrix_tiles_file, read_matrix_tiles
from .webgpu.widen_gemm_operands import WidenGemmOperands

__all__ = [
    "CONV_LAYOUTS",
    "PHASES",
    "WEBGPU_ATTENTION",
    "PipelineOptions",
    "conv_layout",
    "phases",
    "pipeline",
    "tir_pipeline",
]

PHASES = ("weights", "graph", "fuse", "kernels", "schedule", "memory", "finalize")
CONV_LAYOUTS = ("auto", "NCHW", "NHWC")
# the float16 flash attentions' kernel beside the portable one, where subgroup matrices are planned
WEBGPU_ATTENTION = ("matrix", "lanes", "portable")
DTYPES = ("float32", "float16")

Database: TypeAlias = "ms.Database | str | os.PathLike[str]"


@dataclass(frozen=True)
class PipelineOptions:
    """What the phases do beyond the target's defaults.

    ``dtype``: ``"float16"`` computes in float16 with float32 accumulators (:class:`MixedPrecision`).
    ``conv_layout``: ``"auto"`` (NHWC for cuda float16, where tensor-core implicit GEMMs want channels
    last, and for webgpu, where :class:`~mlcweb_passes.webgpu.gemm.WebGPUMatmul` reads both operands of
    a convolution 4 elements at a time along its reduction; the imported NCHW elsewhere), ``"NCHW"`` or
    ``"NHWC"``. ``flash_attention``: attention as one kernel where the target has one (float16 on CUDA
    sm_80+, float16 and float32 on WebGPU).
    ``split_k``: split the reduction of NHWC convolutions with few output tiles (float16 on CUDA sm_70+;
    float16 and float32 on WebGPU); ``split_k_policy``: when and how finely (default: the
    :class:`~mlcweb_passes.rewrites.split_k_conv.SplitPolicy` measured on CUDA; on WebGPU,
    :func:`~mlcweb_passes.rewrites.split_k_conv.webgpu_split_policy` for the first matrix tile).
    ``wgmma``: float16 GEMMs as generated Hopper kernels on sm_90.
    ``widen_gemm_operands``: on WebGPU, float16 GEMMs with float32 results convert their operands once
    per workgroup copy instead of once per multiply-add (``webgpu.widen_gemm_operands``; off by default,
    as measured in benchmarks/README.md).
    ``vector_loads``: on WebGPU, storage buffers a kernel only reads in aligned 4-wide vectors are declared
    ``array<vec4<T>>`` and read with one load each (``webgpu.vector_storage``, a TIR-level pass: give
    :func:`tir_pipeline`'s name to ``tvm.compile``).
    ``webgpu_matrix``: on WebGPU, float16 GEMMs also get kernels on subgroup matrices of this
    configuration (:mod:`~mlcweb_passes.webgpu.matrix_gemm`; planned here, written after compilation by
    :func:`~mlcweb_passes.webgpu.matrix_gemm.matrix_kernels` for pages to use where the adapter offers it);
    ``webgpu_matrix_tiles``: the GEMM kernels' tiles in order of preference (default
    :data:`~mlcweb_passes.webgpu.matrix_gemm.TILE_ORDER`), within ``webgpu_matrix_shared`` bytes of
    workgroup memory (default: the target's ``max_shared_memory_per_block``; the page uses the kernels
    only where the adapter grants what they declare); ``webgpu_matrix_tuned``: measured tiles by GEMM
    size, taken first where they fit (:mod:`~mlcweb_passes.webgpu.matrix_tiles`; default: the database
    directory's ``webgpu_matrix_tiles.json``, if any); ``webgpu_matrix_larger``: workgroup memory sizes
    (bytes) past the target's for which the GEMMs are planned again, a table for adapters granting that
    much (module attribute ``matrix_gemm.plans_attr(bytes)``; tiles from the database directory's
    ``webgpu_matrix_tiles_<bytes>.json``, if any). ``webgpu_attention`` (one of
    :data:`WEBGPU_ATTENTION`): with ``webgpu_matrix``, the float16 flash attentions' kernel beside the
    portable one: ``"matrix"`` on subgroup matrices (the default; :mod:`~mlcweb_passes.webgpu.matrix_attention`),
    ``"portable"`` none (TVM's kernel everywhere), ``"lanes"`` in
    hand-written WGSL on the lanes (:mod:`~mlcweb_passes.webgpu.lane_attention`, slower than the portable
    kernel on the GPUs measured). ``webgpu_flash_tiles``: tiles the portable flash attention tries before
    its own (:data:`~mlcweb_passes.webgpu.flash_attention.TILES`), each where it fits the target.
    ``database``: a MetaSchedule database to take tuned schedules from (a directory that also holds a
    WebGPU tile table, ``webgpu_gemm_tiles.json``, gives WebGPU GEMMs its tiles too). ``webgpu_tiles``: a
    tile table (:func:`~mlcweb_passes.webgpu.gemm.read_tile_table`) for WebGPU GEMMs, instead of the
    database directory's. ``gpu``: the GPU to size kernels for (default:
    :func:`~mlcweb_passes.targets.gpu_facts` of the target).
    """

    dtype: str = "float32"
    conv_layout: str = "auto"
    flash_attention: bool = True
    split_k: bool = True
    split_k_policy: SplitPolicy | None = None
    wgmma: bool = True
    widen_gemm_operands: bool = False
    vector_loads: bool = True
    webgpu_matrix: MatrixConfig | None = None
    webgpu_attention: str = "matrix"
    webgpu_matrix_tiles: tuple[MatrixTile, ...] = TILE_ORDER
    webgpu_matrix_shared: int | None = None
    webgpu_matrix_tuned: Mapping[str, MatrixTile] | None = None
    webgpu_matrix_larger: tuple[int, ...] = (49152,)
    webgpu_flash_tiles: tuple[WebGPUFlashTile, ...] = ()
    database: Database | None = None
    webgpu_tiles: Mapping[str, WebGPUTile] | None = None
    gpu: GpuFacts | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.webgpu_attention not in WEBGPU_ATTENTION:
            choices = ", ".join(WEBGPU_ATTENTION)
            raise ValueError(f"unknown webgpu_attention {self.webgpu_attention!r}; choose one of {choices}")
        if self.conv_layout not in CONV_LAYOUTS:
            raise ValueError(f"unknown conv layout {self.conv_layout!r}; choose one of {', '.join(CONV_LAYOUTS)}")


def conv_layout(target: Target, options: PipelineOptions) -> str:
    """The convolution layout ``options`` give for ``target``, "auto" resolved."""
    if options.conv_layout != "auto":
        return options.conv_layout
    if target.kind.name == "webgpu":
        return "NHWC"  # both operands of an implicit-GEMM convolution K-contiguous: 4-wide loads
    return "NHWC" if target.kind.name == "cuda" and options.dtype == "float16" else "NCHW"


def _sequential(name: str, passes: Sequence[tvm.transform.Pass]) -> tvm.transform.Sequential:
    return tvm.transform.Sequential(list(passes), name=f"mlcweb.{name}")


def weight_phase(
    target: Target, options: PipelineOptions, extra: Sequence[tvm.transform.Pass] = ()
) -> tvm.transform.Sequential:
    passes: list[tvm.transform.Pass] = [FoldLinearReshapes()]
    if options.dtype == "float16":
        passes.append(MixedPrecision("float32"))
    nhwc = conv_layout(target, options) == "NHWC"
    if nhwc:
        # Tensor-core layouts: channels last and GEMM weights K-contiguous; the weights' transposes
        # become part of the weight transform (or, for linears, disappear).
        passes += [ConvLayout("NHWC", "OHWI"), LinearWeightLayout()]
    passes += extra
    if nhwc and options.split_k and (sm_version(target) >= 70 or target.kind.name == "webgpu"):
        # here, so the kernels' reshape to [out, kh, kw, slices, channels / slice] is part of the transform
        webgpu = target.kind.name == "webgpu"
        dtypes = ("float16", "float32") if webgpu else ("float16",)
        widen = webgpu and options.widen_gemm_operands
        sms = _gpu(target, options).sm_count
        policy = options.split_k_policy
        if policy is None and webgpu:
            first = options.webgpu_matrix_tiles[0]
            policy = webgpu_split_policy((first.rows, first.cols))
        passes.append(SplitKConv(sm_count=sms, dtypes=dtypes, widen=widen, policy=policy))
    return _sequential("weights", passes)


def graph_phase(
    target: Target, options: PipelineOptions, extra: Sequence[tvm.transform.Pass] = ()
) -> tvm.transform.Sequential:
    passes: list[tvm.transform.Pass] = [
        DropSoftmaxGuard(),
        ClampGatherIndices(),
        IntegerCumsum(),
        FoldBoolIdentities(),
        CancelTransposes(),
        FoldPadIntoConv(),
    ]
    if target.kind.name == "webgpu":
        passes += [Int32Tensors(), FiniteFloatLiterals()]
    passes += _library_dispatch(target)
    passes += _flash_attention(target, options)
    if target.kind.name == "webgpu":
        # attention the kernel does not take (a mask, the VAE's 512-wide head, flash_attention=False):
        # every score matrix under 256 MiB, so buffers stay under 512 MiB
        passes.append(ChunkAttentionRows())
    return _sequential("graph", [*passes, *extra])


def _flash_attention(target: Target, options: PipelineOptions) -> list[tvm.transform.Pass]:
    """The target's flash-attention rewrite: tensor-core kernels on CUDA sm_80+ (float16), the portable
    kernel on WebGPU sized by the target's workgroup limits (float16 and float32), preferring
    ``options.webgpu_flash_tiles``; else none."""
    if not options.flash_attention:
        return []
    if supports_flash_attention(target):
        return [FlashAttention()]
    if target.kind.name == "webgpu":
        gpu = _gpu(target, options)
        shared, threads = gpu.max_shared_bytes, gpu.max_threads
        first = options.webgpu_flash_tiles
        kernel = functools.partial(webgpu_flash_attention_kernel, max_shared=shared, max_threads=threads, first=first)
        supports = functools.partial(fits_webgpu_flash_attention, max_shared=shared, max_threads=threads, first=first)
        return [FlashAttention(kernel, dtypes=("float16", "float32"), supports=supports)]
    return []


def fuse_phase(
    target: Target, options: PipelineOptions, extra: Sequence[tvm.transform.Pass] = ()
) -> tvm.transform.Sequential:
    passes: list[tvm.transform.Pass] = []
    if target.kind.name == "webgpu" and options.widen_gemm_operands:
        passes.append(WidenGemmOperands())
    passes += [
        FuseSoftmax(),
        HoistNarrowingCasts(),
        # One copy of repeated work, e.g. the text embeddings' cast for each cross-attention's K and V: a
        # kernel that reads a function input runs outside CUDA graphs, so 32 copies split the UNet's graph.
        relax.transform.EliminateCommonSubexpr(),
        FuseOperators(),
    ]
    return _sequential("fuse", [*passes, *extra])


def kernel_phase(
    target: Target, options: PipelineOptions, extra: Sequence[tvm.transform.Pass] = ()
) -> tvm.transform.Sequential:
    passes: list[tvm.transform.Pass] = []
    if options.wgmma and supports_wgmma(target):
        passes.append(WgmmaGemm(sm_count=_gpu(target, options).sm_count))
    if options.webgpu_matrix is not None and options.dtype == "float16" and target.kind.name == "webgpu":
        shared, tiles = options.webgpu_matrix_shared, options.webgpu_matrix_tiles
        passes.append(PlanMatrixGemms(options.webgpu_matrix, shared, tiles, tuned=_matrix_tuned(options)))
        own = workgroup_limit(target, shared)
        for larger in sorted(size for size in options.webgpu_matrix_larger if size > own):
            tuned = _matrix_tuned(options, larger)
            attr = plans_attr(larger)
            passes.append(PlanMatrixGemms(options.webgpu_matrix, larger, tiles, tuned=tuned, attr=attr))
        if options.webgpu_attention != "portable":
            lanes = options.webgpu_attention == "lanes"
            passes.append(PlanMatrixAttention(options.webgpu_matrix, shared, lanes=lanes))
    return _sequential("kernels", [*passes, *extra])


def schedule_phase(
    target: Target, options: PipelineOptions, extra: Sequence[tvm.transform.Pass] = ()
) -> tvm.transform.Sequential:
    gpu = _gpu(target, options) if is_gpu_target(target) else None
    tiles = _webgpu_tiles(target, options)
    passes: list[tvm.transform.Pass] = [ApplyDatabase(target, options.database, gpu, tiles), *extra]
    # Kernels' global scratch as planned tensors: CUDA graphs capture addresses, which the runtime's
    # workspace pool may free and reallocate between calls.
    passes.append(LiftKernelScratch())
    return _sequential("schedule", passes)


def _database_file(options: PipelineOptions, name: str) -> Path | None:
    """The file ``name`` in the database directory ``options.database``, where it is one and has it."""
    if isinstance(options.database, (str, os.PathLike)):
        path = Path(options.database) / name
        return path if path.is_file() else None
    return None


def _matrix_tuned(options: PipelineOptions, larger: int | None = None) -> Mapping[str, MatrixTile] | None:
    """The build's own table: ``options.webgpu_matrix_tuned``, else the matrix tile table in the database
    directory (if any); for a table within ``larger`` bytes, that directory's table for the size."""
    if larger is None and options.webgpu_matrix_tuned is not None:
        return options.webgpu_matrix_tuned
    table = _database_file(options, matrix_tiles_file(larger))
    return read_matrix_tiles(table) if table else None


def _webgpu_tiles(target: Target, options: PipelineOptions) -> Mapping[str, WebGPUTile] | None:
    """On WebGPU, ``options.webgpu_tiles``, else the tile table in the database directory (if any)."""
    if target.kind.name != "webgpu":
        return None
    if options.webgpu_tiles is not None:
        return options.webgpu_tiles
    table = _database_file(options, TILE_TABLE_FILE)
    return read_tile_table(table) if table else None


def memory_phase(
    target: Target, options: PipelineOptions, extra: Sequence[tvm.transform.Pass] = ()
) -> tvm.transform.Sequential:
    return _sequential("memory", [StaticMemoryPlan(), *extra])


def finalize_phase(
    target: Target, options: PipelineOptions, extra: Sequence[tvm.transform.Pass] = ()
) -> tvm.transform.Sequential:
    # RewriteCUDAGraph acts only where the PassContext sets relax.backend.use_cuda_graph.
    passes = [
        relax.transform.RewriteCUDAGraph(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]
    return _sequential("finalize", [*extra, *passes])


_BUILDERS = {
    "weights": weight_phase,
    "graph": graph_phase,
    "fuse": fuse_phase,
    "kernels": kernel_phase,
    "schedule": schedule_phase,
    "memory": memory_phase,
    "finalize": finalize_phase,
}


def phases(
    target: Target | str | dict[str, object],
    options: PipelineOptions | None = None,
    extra: Mapping[str, Sequence[tvm.transform.Pass]] | None = None,
) -> dict[str, tvm.transform.Sequential]:
    """Every phase of :data:`PHASES` for ``target``, in order, each with ``extra[phase]`` added. Run them
    under ``with target:`` (the passes read the current target)."""
    tgt = _target(target)
    opts = options or PipelineOptions()
    added = dict(extra or {})
    unknown = sorted(set(added) - set(PHASES))
    if unknown:
        raise ValueError(f"unknown phase(s) {', '.join(unknown)}; the phases are {', '.join(PHASES)}")
    if is_gpu_target(tgt) and opts.gpu is None:
        opts = dataclasses.replace(opts, gpu=gpu_facts(tgt))  # read the device once
    return {name: _BUILDERS[name](tgt, opts, tuple(added.get(name, ()))) for name in PHASES}


def pipeline(
    target: Target | str | dict[str, object],
    options: PipelineOptions | None = None,
    extra: Mapping[str, Sequence[tvm.transform.Pass]] | None = None,
    *,
    after: str | None = None,
    until: str | None = None,
) -> tvm.transform.Pass:
    """The phases from the one after ``after`` (default: the first) through ``until`` (default: the last)
    as one pass, run under ``target``: what ``tvm.compile(..., relax_pipeline=...)`` takes."""
    tgt = _target(target)
    every = phases(tgt, options, extra)
    names = _span(after, until)
    sequence = _sequential("pipeline", [every[name] for name in names])

    @tvm.transform.module_pass(opt_level=0, name="mlcweb.pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with tgt:
            return sequence(mod)

    return _pipeline


def tir_pipeline(target: Target | str | dict[str, object], options: PipelineOptions | None = None) -> str:
    """The TIR pipeline (a registered name) that ``tvm.compile(..., tir_pipeline=...)`` takes beside
    :func:`pipeline` for ``target`` and ``options``: TVM's default, or on WebGPU with ``vector_loads`` the
    default followed by :class:`~mlcweb_passes.webgpu.vector_storage.WebGPUVectorStorage`."""
    opts = options or PipelineOptions()
    if _target(target).kind.name == "webgpu" and opts.vector_loads:
        return vector_storage.tir_pipeline()
    return "default"


def _span(after: str | None, until: str | None) -> tuple[str, ...]:
    for name in (after, until):
        if name is not None and name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; the phases are {', '.join(PHASES)}")
    start = PHASES.index(after) + 1 if after is not None else 0
    stop = PHASES.index(until) + 1 if until is not None else len(PHASES)
    if start >= stop:
        raise ValueError(f"no phase after {after!r} through {until!r}")
    return PHASES[start:stop]


def _target(target: Target | str | dict[str, object]) -> Target:
    return target if isinstance(target, Target) else Target(target)


def _gpu(target: Target, options: PipelineOptions) -> GpuFacts:
    return options.gpu or gpu_facts(target)


def _library_dispatch(target: Target) -> list[tvm.transform.Pass]:
    try:
        return list(relax.pipeline.library_dispatch_passes(target))
    except ValueError:
        return []


def describe(target: Target | str | dict[str, object], options: PipelineOptions | None = None) -> str:
    """The phases and their passes for ``target``, one line a phase."""
    lines = []
    for name, seq in phases(target, options).items():
        passes = [p.info.name for p in seq.passes]
        lines.append(f"{name:<9} {', '.join(passes) or '(nothing for this target)'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="print the mlcweb pipeline's phases for a target")
    parser.add_argument(
        "--target", default="llvm", help='a TVM target kind or JSON, e.g. \'{"kind": "cuda", "arch": "sm_90"}\''
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    args = parser.parse_args(argv)
    target = json.loads(args.target) if args.target.startswith("{") else args.target
    if target == "cuda":
        target = {"kind": "cuda", "arch": "sm_90"}
    print(describe(target, PipelineOptions(dtype=args.dtype)))
    return 0

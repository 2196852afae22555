"""mlcweb_passes: Relax passes and a phased pipeline for compiling models with Apache TVM.

Standalone: it imports TVM and nothing of ``mlcweb``, so any TVM project can use it::

    import mlcweb_passes as mp
    mod, params = mp.detach_params(imported_mod)
    exe = tvm.compile(mod, target, relax_pipeline=mp.pipeline(target), tir_pipeline=mp.tir_pipeline(target))

The package, by kind (one pass per module; see ``docs/passes.md``):

- ``pipeline``: the phases (:data:`PHASES`), :func:`pipeline` and :func:`tir_pipeline`; ``targets``: GPU facts;
- top level: parameter detaching, weight lifting, module utilities;
- ``rewrites/``: Relax graph rewrites (layouts, precision, fusion, memory planning);
- ``schedules/``: schedule rules (dlight-style) and database application;
- ``cuda/``: CUDA kernel generators (Hopper wgmma GEMMs, flash attention, tensor-core tiles);
- ``webgpu/``: WebGPU kernel generators.

This namespace exports the passes and the entry points; tile choices and kernel internals stay in
their modules (``mlcweb_passes.cuda.wgmma_plan`` and so on).
"""

from .cuda.flash_attention import FlashAttention
from .cuda.wgmma_gemm import WgmmaGemm, supports_wgmma
from .detach_params import ParamNameError, detach_params, param_names, unique_param_names
from .lift_transform_params import LiftedModules, apply_transform_params, compile_transform, split_transform_params
from .module_utils import FunctionNameClashError, RemoveUnusedFunctions, merge_modules, reachable_functions
from .pipeline import (
    CONV_LAYOUTS,
    PHASES,
    WEBGPU_ATTENTION,
    PipelineOptions,
    conv_layout,
    phases,
    pipeline,
    tir_pipeline,
)
from .rewrites.cancel_transposes import CancelTransposes
from .rewrites.chunk_attention import ChunkAttentionRows
from .rewrites.clamp_gather_indices import ClampGatherIndices
from .rewrites.conv_layout import ConvLayout
from .rewrites.drop_softmax_guard import DropSoftmaxGuard
from .rewrites.finite_literals import FiniteFloatLiterals
from .rewrites.float16_norm_inputs import Float16NormInputs
from .rewrites.float16_residuals import Float16Residuals
from .rewrites.fold_bool_identities import FoldBoolIdentities
from .rewrites.fold_linear_reshapes import FoldLinearReshapes
from .rewrites.fold_pad_into_conv import FoldPadIntoConv
from .rewrites.fuse_ops import FuseOperators, count_kernels
from .rewrites.fuse_softmax import FuseSoftmax
from .rewrites.geglu_pairs import GegluPairs
from .rewrites.hoist_narrowing_casts import HoistNarrowingCasts
from .rewrites.int32_tensors import Int32Tensors
from .rewrites.integer_cumsum import IntegerCumsum
from .rewrites.lift_kernel_scratch import LiftKernelScratch
from .rewrites.linear_weight_layout import LinearWeightLayout
from .rewrites.memory_plan import FunctionMemory, StaticMemoryPlan, memory_report
from .rewrites.merge_projections import MergeProjections
from .rewrites.mixed_precision import KEEP_FLOAT32_ATTR, MixedPrecision
from .rewrites.split_k_conv import SplitKConv, SplitPolicy
from .schedules.apply_database import ApplyDatabase, ScheduleReport, load_database, schedule_report
from .schedules.default_schedule import DefaultSchedule, default_rules, is_scheduled
from .targets import GpuFacts, async_copy_config, gpu_facts, is_gpu_target

__version__ = "0.1.0"

__all__ = [
    "CONV_LAYOUTS",
    "KEEP_FLOAT32_ATTR",
    "PHASES",
    "WEBGPU_ATTENTION",
    "ApplyDatabase",
    "CancelTransposes",
    "ChunkAttentionRows",
    "ClampGatherIndices",
    "ConvLayout",
    "DefaultSchedule",
    "DropSoftmaxGuard",
    "FiniteFloatLiterals",
    "FlashAttention",
    "Float16NormInputs",
    "Float16Residuals",
    "FoldBoolIdentities",
    "FoldLinearReshapes",
    "FoldPadIntoConv",
    "FunctionMemory",
    "FunctionNameClashError",
    "FuseOperators",
    "FuseSoftmax",
    "GegluPairs",
    "GpuFacts",
    "HoistNarrowingCasts",
    "Int32Tensors",
    "IntegerCumsum",
    "LiftKernelScratch",
    "LiftedModules",
    "LinearWeightLayout",
    "MergeProjections",
    "MixedPrecision",
    "ParamNameError",
    "PipelineOptions",
    "RemoveUnusedFunctions",
    "ScheduleReport",
    "SplitKConv",
    "SplitPolicy",
    "StaticMemoryPlan",
    "WgmmaGemm",
    "apply_transform_params",
    "async_copy_config",
    "compile_transform",
    "conv_layout",
    "count_kernels",
    "default_rules",
    "detach_params",
    "gpu_facts",
    "is_gpu_target",
    "is_scheduled",
    "load_database",
    "memory_report",
    "merge_modules",
    "param_names",
    "phases",
    "pipeline",
    "reachable_functions",
    "schedule_report",
    "split_transform_params",
    "supports_wgmma",
    "tir_pipeline",
    "unique_param_names",
]

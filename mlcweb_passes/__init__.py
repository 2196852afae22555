"""mlcweb_passes: Relax passes and a pipeline for compiling models with Apache TVM.

Standalone: it imports TVM and nothing of ``mlcweb``, so any TVM project can use it::

    import mlcweb_passes
    mod, params = mlcweb_passes.detach_params(mod)
    lifted = mlcweb_passes.split_transform_params(mod)
    exe = tvm.compile(lifted.deploy, target, relax_pipeline=mlcweb_passes.pipeline(target))

One pass per module; see ``docs/passes.md``.
"""

from .apply_database import (
    ApplyDatabase,
    ScheduleReport,
    load_database,
    preload_tensor_intrinsics,
    schedule_report,
)
from .channels_last_norm import ChannelsLastNorm
from .conv_layout import ConvLayout
from .default_schedule import CPUParallel, DefaultSchedule, default_rules, is_gpu_target, is_scheduled
from .detach_params import ParamNameError, detach_params, param_names, unique_param_names
from .drop_softmax_guard import DropSoftmaxGuard
from .finite_literals import FiniteFloatLiterals
from .flash_attention import AttentionShape, FlashAttention, flash_attention_kernel, supports_flash_attention
from .float16_norm_inputs import Float16NormInputs
from .float16_residuals import Float16Residuals
from .fuse_attention import ATTENTION_COMPOSITE, FuseAttention, attention_patterns
from .fuse_ops import FuseOperators, count_kernels
from .fuse_softmax import SOFTMAX_COMPOSITE, FuseSoftmax, softmax_patterns
from .geglu_pairs import GegluPairs
from .hoist_narrowing_casts import HoistNarrowingCasts
from .int32_tensors import Int32Tensors, narrow_integer_tensors
from .lift_kernel_scratch import LiftKernelScratch
from .lift_transform_params import LiftedModules, apply_transform_params, compile_transform, split_transform_params
from .linear_weight_layout import LinearWeightLayout
from .memory_plan import FunctionMemory, StaticMemoryPlan, memory_report
from .merge_projections import MergeProjections
from .mixed_precision import MixedPrecision
from .module_utils import FunctionNameClashError, RemoveUnusedFunctions, merge_modules, reachable_functions
from .pipeline import PipelineOptions, lowering_passes, pipeline
from .row_reduction import RowReduction
from .short_row_reduction import ShortRowReduction
from .skinny_matmul import SkinnyMatmul
from .split_k_conv import SplitKConv, choose_splits
from .tensor_core_matmul import ASYNC_COPY_CONFIG, TensorCoreMatmul, TensorCoreTile, async_copy_config, choose_tile
from .wgmma_gemm import WgmmaGemm, choose_wgmma_tile, supports_wgmma
from .wgmma_source import WgmmaTile

__version__ = "0.1.0"

__all__ = [
    "ASYNC_COPY_CONFIG",
    "ATTENTION_COMPOSITE",
    "SOFTMAX_COMPOSITE",
    "ApplyDatabase",
    "AttentionShape",
    "CPUParallel",
    "ChannelsLastNorm",
    "ConvLayout",
    "DefaultSchedule",
    "DropSoftmaxGuard",
    "FiniteFloatLiterals",
    "FlashAttention",
    "Float16NormInputs",
    "Float16Residuals",
    "FunctionMemory",
    "FunctionNameClashError",
    "FuseAttention",
    "FuseOperators",
    "FuseSoftmax",
    "GegluPairs",
    "HoistNarrowingCasts",
    "Int32Tensors",
    "LiftKernelScratch",
    "LiftedModules",
    "LinearWeightLayout",
    "MergeProjections",
    "MixedPrecision",
    "ParamNameError",
    "PipelineOptions",
    "RemoveUnusedFunctions",
    "RowReduction",
    "ScheduleReport",
    "ShortRowReduction",
    "SkinnyMatmul",
    "SplitKConv",
    "StaticMemoryPlan",
    "TensorCoreMatmul",
    "TensorCoreTile",
    "WgmmaGemm",
    "WgmmaTile",
    "apply_transform_params",
    "async_copy_config",
    "attention_patterns",
    "choose_splits",
    "choose_tile",
    "choose_wgmma_tile",
    "compile_transform",
    "count_kernels",
    "default_rules",
    "detach_params",
    "flash_attention_kernel",
    "is_gpu_target",
    "is_scheduled",
    "load_database",
    "lowering_passes",
    "memory_report",
    "merge_modules",
    "narrow_integer_tensors",
    "param_names",
    "pipeline",
    "preload_tensor_intrinsics",
    "reachable_functions",
    "schedule_report",
    "softmax_patterns",
    "split_transform_params",
    "supports_flash_attention",
    "supports_wgmma",
    "unique_param_names",
]

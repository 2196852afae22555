"""Data passed between the host and model plugins."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm

import mlcweb_passes as mp
from mlcweb_passes.webgpu.matrix_gemm import MatrixTile

__all__ = ["BuildOptions", "ImportOptions", "ImportedModel", "ModelSpec", "PhaseContext"]


@dataclass(frozen=True)
class ModelSpec:
    """A model a plugin provides.

    ``name`` is what users type (``mlcweb build NAME``); ``components`` names the Relax functions the
    import produces (for example ``("clip", "unet", "vae")``); ``default_config`` is the plugin's
    own configuration (JSON-serialisable: it is part of the import cache key and the manifest).
    ``runs_per_use`` says how often each function runs for one use of the model (one image: CLIP twice,
    the UNet once per step); ``mlcweb tune`` weights kernels by it. Functions not named run once.
    ``file_options`` names config keys whose values are files (a path, or a list of paths, each with an
    optional ``:suffix`` the plugin reads): the import cache notices when those files change.
    """

    name: str
    description: str
    components: tuple[str, ...] = ("main",)
    default_config: dict[str, Any] = field(default_factory=dict)
    runs_per_use: dict[str, int] = field(default_factory=dict)
    file_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImportOptions:
    """What the user asked for at import time."""

    model_path: Path | None = None
    dtype: str = "float32"
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImportedModel:
    """A model imported into Relax.

    ``mod``: functions whose trailing arguments (after their ``num_input`` attribute) are weights and
    that carry no ``params`` attribute; ``params``: per function, its weights in argument order
    (``mlcweb_passes.detach_params`` gives both); ``metadata``: JSON-serialisable facts for runtimes
    (written into the manifest); ``input_ranges``: per function and integer input, the inclusive
    ``(low, high)`` its values must lie in (token ids below the vocabulary size, timesteps below the
    schedule's length), written into the manifest's input specs and checked by every runtime.
    """

    mod: tvm.IRModule
    params: dict[str, OrderedDict[str, tvm.runtime.Tensor]]
    metadata: dict[str, Any] = field(default_factory=dict)
    input_ranges: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)

    def check(self) -> None:
        names = {gv.name_hint for gv in self.mod.get_global_vars()}
        missing = sorted(set(self.params) - names)
        if missing:
            raise ValueError(f"params given for functions the module does not define: {missing}")


@dataclass(frozen=True)
class BuildOptions:
    """What ``mlcweb build`` was asked to do."""

    target: str
    out: Path
    model_path: Path | None = None
    dtype: str = "float32"
    database: Path | None = None
    use_shipped_database: bool = True  # apply mlcweb/databases/<target class>/ when --db is not given
    weight_encoding: str = "raw"
    use_cache: bool = True
    config: dict[str, Any] = field(default_factory=dict)
    arch: str | None = None
    # webgpu + float16 only: also build a float32 variant in <out>/float32/ for adapters without shader-f16
    webgpu_fallback: bool = True
    # webgpu only: also build a library whose reductions use subgroup operations, for adapters with the
    # subgroups feature and exactly this subgroup size (32, NVIDIA and Apple; TVM builds no other); 0: none
    webgpu_subgroup_size: int = 32
    # webgpu + float16 only: also write kernels on subgroup matrices (tensor cores) for the GEMMs, which the
    # page uses where the adapter offers chromium-experimental-subgroup-matrix with float16 -> float32
    webgpu_matrix: bool = True
    # webgpu + float16 with webgpu_matrix: the flash attentions' kernel beside the portable one (the page
    # installs it with the GEMMs' where the adapter offers subgroup matrices): "matrix" on subgroup
    # matrices (the default), "portable" none (TVM's kernel everywhere), "lanes" in hand-written WGSL on the
    # lanes (slower on the GPUs measured); mlcweb_passes.WEBGPU_ATTENTION
    webgpu_attention: str = "matrix"
    # webgpu + float16 with webgpu_matrix: the GEMM kernels' tiles in order of preference (None: the pass
    # library's TILE_ORDER)
    webgpu_matrix_tiles: tuple[MatrixTile, ...] | None = None
    # cuda only: capture each function's kernel launches once in a CUDA graph and replay it on later calls
    cuda_graph: bool = True
    # layout of 2-D convolutions: "auto" (NHWC for cuda float16, as imported elsewhere), "NCHW" or "NHWC"
    conv_layout: str = "auto"


@dataclass(frozen=True)
class PhaseContext:
    """What a plugin's ``mlcweb_phase_passes`` knows when it chooses passes for a phase: the model, its
    resolved config, the TVM target, the build's options and the pipeline options the phases are made for
    (``mlcweb_passes.conv_layout(context.target, context.pipeline)`` gives the convolution layout)."""

    spec: ModelSpec
    config: dict[str, Any]
    target: tvm.target.Target
    options: BuildOptions
    pipeline: mp.PipelineOptions

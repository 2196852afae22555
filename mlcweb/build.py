"""The build driver: import -> mlcweb_passes pipeline (+ plugin passes) -> compile -> artifacts.

``build(host, model, options)`` writes into a temporary directory beside ``options.out`` and renames it
into place at the end, so a failed or killed build leaves no half-written output. The artifacts:

- ``<model>-<target><suffix>``: the compiled library (Relax VM executable);
- ``tensor-cache.json`` + ``params_shard_<i>.bin``: the deploy weights (after weight lifting);
- whatever the plugin's ``mlcweb_write_assets`` writes;
- ``manifest.json``: every file with size and sha256, the model, target, dtype, functions and versions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm
from tqdm import tqdm
from tvm import relax

import mlcweb_passes as mp

from .databases import shipped_database
from .errors import MlcwebError
from .import_cache import ImportCache, cache_key
from .manifest import MANIFEST, write_manifest
from .model import DTYPES, BuildOptions, ImportedModel, ImportOptions
from .plugins import PluginHost
from .targets import TargetInfo, resolve_target
from .tensor_cache import write_tensor_cache
from .wasm_runtime import link_wasm
from .web import write_web_runtime

__all__ = ["BuildResult", "build", "import_and_lift", "pre_schedule_passes"]

log = logging.getLogger(__name__)

FLOAT32_VARIANT = "float32"


@dataclass
class BuildResult:
    out: Path
    manifest: dict[str, Any]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    kernels: int = 0
    memory: dict[str, mp.FunctionMemory] = field(default_factory=dict)
    schedules: mp.ScheduleReport | None = None
    from_cache: bool = False

    def summary(self) -> str:
        lines = [
            f"built {self.manifest['model']} for {self.manifest['target']} ({self.manifest['dtype']}) in {self.out}"
        ]
        for stage, secs in self.stage_seconds.items():
            lines.append(
                f"  {stage:<10} {secs:7.1f} s"
                + ("  (import cache hit)" if stage == "import" and self.from_cache else "")
            )
        lines.append(f"  kernels    {self.kernels}" + (f"  ({self.schedules.summary()})" if self.schedules else ""))
        for name, mem in self.memory.items():
            if mem.storages:
                planned, largest = mem.planned_bytes / 2**20, mem.largest_bytes / 2**20
                lines.append(f"  memory     {name}: {planned:.1f} MiB planned, largest block {largest:.1f} MiB")
        for entry in self.manifest["files"]:
            lines.append(f"  {entry['path']:<40} {entry['size'] / 2**20:9.2f} MiB")
        return "\n".join(lines)


class _Stages:
    """Times named stages and shows them on one progress bar."""

    def __init__(self, names: list[str], show: bool) -> None:
        self.seconds: dict[str, float] = {}
        self.bar = tqdm(total=len(names), desc="build", unit="stage", disable=not show, leave=False)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.bar.set_description(f"build: {name}")
        start = time.perf_counter()
        log.info("stage %s", name)
        yield
        self.seconds[name] = time.perf_counter() - start
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _import(host: PluginHost, model: str, options: BuildOptions) -> tuple[ImportedModel, bool]:
    spec = host.model(model).spec
    config = {**spec.default_config, **options.config}
    import_options = ImportOptions(model_path=options.model_path, dtype=options.dtype, config=config)
    if options.model_path is not None and not options.model_path.exists():
        raise MlcwebError(f"model folder {options.model_path} does not exist; pass --model with an existing folder")
    cache = ImportCache()
    key = cache_key(model, config, import_options, host.source_digest(host.model(model).plugin))
    if options.use_cache:
        cached = cache.load(key)
        if cached is not None:
            log.info("import cache hit %s", key)
            return cached, True
    imported = host.import_model(model, import_options)
    if options.use_cache:
        cache.store(key, imported)
    return imported, False


def _entry_functions(mod: tvm.IRModule) -> list[str]:
    """Public Relax functions with a ``num_input`` attribute: what the artifacts expose."""
    return sorted(
        gv.name_hint
        for gv, f in mod.functions_items()
        if isinstance(f, relax.Function)
        and f.attrs is not None
        and "num_input" in f.attrs
        and "global_symbol" in f.attrs
    )


CONV_LAYOUTS = ("auto", "NCHW", "NHWC")


def conv_layout(options: BuildOptions, target: TargetInfo) -> str:
    """The convolution layout a build uses: ``options.conv_layout``, with "auto" meaning NHWC for cuda
    float16 (tensor-core implicit GEMMs want channels last; measured there) and the imported NCHW
    elsewhere. NHWC also keeps linear weights ``[out, in]`` (:class:`~mlcweb_passes.LinearWeightLayout`)."""
    if options.conv_layout not in CONV_LAYOUTS:
        raise MlcwebError(f"unknown conv layout {options.conv_layout!r}; choose one of {', '.join(CONV_LAYOUTS)}")
    if options.conv_layout == "auto":
        return "NHWC" if target.name == "cuda" and options.dtype == "float16" else "NCHW"
    return options.conv_layout


def pre_lift_passes(options: BuildOptions, target: TargetInfo) -> list[tvm.transform.Pass]:
    """The passes run on the imported module before weight lifting: those that change how weights are
    stored, so the change happens once, to the weights (casts, transposes, reshapes)."""
    passes: list[tvm.transform.Pass] = []
    if options.dtype == "float16":
        passes.append(mp.MixedPrecision("float32"))
    if conv_layout(options, target) == "NHWC":
        passes += [
            # Tensor-core layouts: channels last and GEMM weights K-contiguous; the weights' transposes
            # become part of the weight transform (or, for linears, disappear).
            mp.ConvLayout("NHWC", "OHWI"),
            mp.LinearWeightLayout(),
            # float16 between GEMM epilogues and norms, shortcut branches and upsampler inputs (measured
            # with these layouts, on cuda); the norms' float16 scale and shift are stored
            mp.Float16NormInputs(),
            mp.Float16Residuals(),
        ]
        if mp.supports_wgmma(target.tvm_target()):
            # GEGLU's value and gate columns interleaved (the weights' reorder is part of the transform),
            # so WgmmaGemm computes a * gelu(g) in the projection's epilogue
            passes.append(mp.GegluPairs())
            # one GEMM for each self-attention's Q, K and V; flash attention reads the three from it
            passes.append(mp.MergeProjections())
        if mp.tensor_core_matmul.sm_version(target.tvm_target()) >= 70:
            # split-K for convolutions with few output tiles (the pipeline would do it too): here, so
            # the kernels' reshape to [out, kh, kw, slices, channels / slice] is part of the transform
            passes.append(mp.SplitKConv())
    return passes


def _lift(
    imported: ImportedModel, passes: list[tvm.transform.Pass]
) -> tuple[tvm.IRModule, dict[str, OrderedDict[str, tvm.runtime.Tensor]]]:
    mod = tvm.transform.Sequential(passes)(imported.mod) if passes else imported.mod
    lifted = mp.split_transform_params(mod)
    transform_vm = mp.compile_transform(lifted.transform)  # once, shared by every function's weights
    weights: dict[str, OrderedDict[str, tvm.runtime.Tensor]] = {}
    for func in _entry_functions(lifted.deploy):
        params = imported.params.get(func)
        if not params:
            weights[func] = OrderedDict()
            continue
        values = mp.apply_transform_params(transform_vm, params, func)
        names = mp.unique_param_names(lifted.deploy[func])
        weights[func] = OrderedDict(zip(names, values, strict=True))
    return lifted.deploy, weights


def import_and_lift(
    host: PluginHost, model: str, options: BuildOptions
) -> tuple[tvm.IRModule, dict[str, OrderedDict[str, tvm.runtime.Tensor]], ImportedModel]:
    """The build's first two stages: the deploy module, its weights per function, and the import."""
    imported, _ = _import(host, model, options)
    target = resolve_target(options.target, arch=options.arch, link=False)
    deploy, weights = _lift(imported, pre_lift_passes(options, target))
    return deploy, weights, imported


def pre_schedule_passes(target: tvm.target.Target, extra: list[Any], wgmma: bool = True) -> list[tvm.transform.Pass]:
    """The build's lowering passes before scheduling: what ``mlcweb tune`` extracts kernels after.
    ``wgmma=False`` leaves the GEMMs that ``WgmmaGemm`` would take as TIR (for tile benchmarks)."""
    passes = mp.lowering_passes(target, None, mp.PipelineOptions(extra_passes=tuple(extra), wgmma=wgmma))
    return passes[: next(i for i, p in enumerate(passes) if p.info.name == "mlcweb.ApplyDatabase")]


def _pass_config(target: tvm.target.Target, options: BuildOptions) -> dict[str, Any]:
    """PassContext config of lowering and compiling: CUDA graphs where asked for, and on sm_80+ the
    asynchronous global-to-shared copies (cp.async) of the tensor-core tiles."""
    config: dict[str, Any] = mp.async_copy_config(target)
    if target.kind.name == "cuda":
        config["relax.backend.use_cuda_graph"] = options.cuda_graph
    return config


def _lower(
    mod: tvm.IRModule, target: tvm.target.Target, options: BuildOptions, extra: list[Any]
) -> tuple[tvm.IRModule, int, mp.ScheduleReport, dict[str, mp.FunctionMemory]]:
    passes = mp.lowering_passes(target, options.database, mp.PipelineOptions(extra_passes=tuple(extra)))
    split = next(i for i, p in enumerate(passes) if p.info.name == "mlcweb.StaticMemoryPlan") + 1
    # RewriteCUDAGraph (in the pipeline) acts only when this is set: it moves the planned allocations into
    # a function run once and the kernel launches between them into a graph captured on the first call.
    with target, tvm.transform.PassContext(config=_pass_config(target, options)):
        planned = tvm.transform.Sequential(passes[:split])(mod)
        report = mp.schedule_report(planned)
        memory = mp.memory_report(planned)
        lowered = tvm.transform.Sequential(passes[split:])(planned)
    return lowered, mp.count_kernels(lowered), report, memory


def _functions_info(deploy: tvm.IRModule, weights: dict[str, OrderedDict[str, tvm.runtime.Tensor]]) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for func in sorted(weights):
        f = deploy[func]
        n_in = int(f.attrs["num_input"])
        info[func] = {
            "inputs": [
                {"name": p.name, "shape": [int(d) for d in p.ty.shape], "dtype": str(p.ty.dtype)}
                for p in f.params[:n_in]
            ],
            "params": [f"{func}/{name}" for name in weights[func]],
        }
    return info


def _export(exe: relax.VMExecutable, path: Path, target: TargetInfo) -> None:
    if target.name == "webgpu":
        exe.export_library(str(path), fcompile=link_wasm)
    else:
        exe.export_library(str(path))


def build(
    host: PluginHost,
    model: str,
    options: BuildOptions,
    *,
    progress: bool = True,
    before_rename: Callable[[Path], None] | None = None,
) -> BuildResult:
    """Build ``model`` as ``options`` say; see the module docstring for what lands in ``options.out``."""
    if options.dtype not in DTYPES:
        raise MlcwebError(f"unknown dtype {options.dtype!r}; choose one of {', '.join(DTYPES)}")
    spec = host.model(model).spec
    target_info = resolve_target(options.target, arch=options.arch)
    target = target_info.tvm_target()
    layout = conv_layout(options, target_info)  # checked here, before any work; recorded in the manifest
    database_note: str | None = "--db" if options.database is not None else None
    if options.database is None and options.use_shipped_database:
        shipped = shipped_database(target_info)
        if shipped is not None:
            options = dataclasses.replace(options, database=shipped)
            database_note = f"shipped:{shipped.name}"
            log.info("applying the shipped database %s", shipped.name)
    out = options.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    with_variant = target_info.name == "webgpu" and options.dtype == "float16" and options.webgpu_fallback
    names = ["import", "lift", "lower", "compile", "weights", "assets", "manifest"]
    if with_variant:
        names.insert(-1, "float32 variant")
    stages = _Stages(names, progress)
    try:
        with stages.stage("import"):
            imported, from_cache = _import(host, model, options)
        with stages.stage("lift"):
            deploy, weights = _lift(imported, pre_lift_passes(options, target_info))
        with stages.stage("lower"):
            extra = host.pipeline_passes(model, target=target, options=options)
            lowered, kernels, schedules, memory = _lower(deploy, target, options, extra)
        with stages.stage("compile"):
            with tvm.transform.PassContext(config=_pass_config(target, options)):
                exe = tvm.compile(lowered, target, relax_pipeline=None)
            library = f"{model}-{target_info.name}{target_info.library_suffix}"
            _export(exe, tmp / library, target_info)
        with stages.stage("weights"):
            flat = {f"{func}/{name}": t for func, ws in weights.items() for name, t in ws.items()}
            files = [library, *write_tensor_cache(flat, tmp, encoding=options.weight_encoding)]
        with stages.stage("assets"):
            files += host.write_assets(model, out_dir=tmp, target=target, options=options, imported=imported)
            if target_info.name == "webgpu":
                files += write_web_runtime(tmp)
        variants = {}
        if with_variant:
            with stages.stage("float32 variant"):
                files += _float32_variant(host, model, options, tmp)
                variants["float32"] = f"{FLOAT32_VARIANT}/"
        with stages.stage("manifest"):
            info = {
                "model": model,
                "plugin": host.model(model).plugin,
                "config": {**spec.default_config, **options.config},
                "target": target_info.name,
                "tvm_target": {"target": target_info.kind, "host": target_info.host},
                "device": target_info.device,
                "dtype": options.dtype,
                "conv_layout": layout,
                "weight_encoding": options.weight_encoding,
                "library": library,
                "functions": _functions_info(deploy, weights),
                "metadata": imported.metadata,
                "variants": variants,
                "database": database_note,
            }
            write_manifest(tmp, files, info)
        if before_rename is not None:
            before_rename(tmp)
        _replace_dir(tmp, out)
    finally:
        stages.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    manifest = json.loads((out / MANIFEST).read_text())
    return BuildResult(out, manifest, stages.seconds, kernels, memory, schedules, from_cache)


def _float32_variant(host: PluginHost, model: str, options: BuildOptions, tmp: Path) -> list[str]:
    """Build the float32 variant of a webgpu float16 build into ``tmp/float32``: the page loads it when
    the adapter lacks shader-f16. Returns its files relative to ``tmp``, for the outer manifest."""
    inner = dataclasses.replace(options, dtype="float32", out=tmp / FLOAT32_VARIANT, webgpu_fallback=False)
    result = build(host, model, inner, progress=False)
    return [f"{FLOAT32_VARIANT}/{entry['path']}" for entry in result.manifest["files"]] + [
        f"{FLOAT32_VARIANT}/{MANIFEST}"
    ]


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``, replacing an existing ``out`` only once ``tmp`` is complete."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)

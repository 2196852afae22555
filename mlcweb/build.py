"""The build driver: import -> the mlcweb_passes phases (with the plugin's passes) -> compile -> artifacts.

``build(host, model, options)`` writes into a temporary directory beside ``options.out`` and renames it
into place at the end, so a failed or killed build leaves no half-written output. The artifacts:

- ``<model>-<target><suffix>``: the compiled library (Relax VM executable);
- ``tensor-cache.json`` + ``params_shard_<i>.bin``: the deploy weights (after weight lifting);
- whatever the plugin's ``mlcweb_write_assets`` writes;
- ``manifest.json``: every file with size and sha256, the model, target, dtype, functions and versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
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
from mlcweb_passes.webgpu.matrix_attention import planned_kernels
from mlcweb_passes.webgpu.matrix_gemm import PLANS_ATTR, TILE_ORDER, MatrixConfig, plans_attr

from .choices import DTYPES
from .databases import shipped_database
from .errors import MlcwebError
from .import_cache import ImportCache, cache_key
from .interrupts import Interrupts
from .manifest import MANIFEST, is_mlcweb_build, write_manifest
from .model import BuildOptions, ImportedModel, ImportOptions, PhaseContext
from .plugins import PluginHost, RegisteredModel
from .targets import TargetInfo, resolve_target, with_subgroups
from .temp_dirs import make_temp_dir, remove_stale
from .tensor_cache import write_tensor_cache
from .wasm_runtime import link_wasm
from .web import write_web_runtime
from .wgsl_check import check_matrix_wgsl, check_wgsl, wgsl_sources, workgroup_needs

__all__ = ["BuildResult", "MemoryPlan", "ModelBuild", "build", "build_phases", "lower_until", "plan_memory", "resolve"]

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
    """Times named stages and shows them on one progress bar; an interrupt that a library swallowed
    during a stage is raised again when the stage ends."""

    def __init__(self, names: list[str], show: bool, interrupts: Interrupts) -> None:
        self.seconds: dict[str, float] = {}
        self.bar = tqdm(total=len(names), desc="build", unit="stage", disable=not show, leave=False)
        self.interrupts = interrupts

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.bar.set_description(f"build: {name}")
        start = time.perf_counter()
        log.info("stage %s", name)
        yield
        self.interrupts.check()
        self.seconds[name] = time.perf_counter() - start
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


@dataclass(frozen=True)
class ModelBuild:
    """One build's decisions, resolved once: the plugin's model and its config, the target, and the
    pipeline options (dtype, layout, GPU facts) the phases are made for."""

    name: str
    registered: RegisteredModel
    config: dict[str, Any]
    options: BuildOptions
    target_info: TargetInfo
    pipeline: mp.PipelineOptions

    @property
    def target(self) -> tvm.target.Target:
        return self.target_info.tvm_target()

    @property
    def conv_layout(self) -> str:
        return mp.conv_layout(self.target, self.pipeline)

    def phase_context(self) -> PhaseContext:
        return PhaseContext(self.registered.spec, self.config, self.target, self.options, self.pipeline)


def resolve(host: PluginHost, model: str, options: BuildOptions, *, link: bool = True) -> ModelBuild:
    """Resolve ``model`` and ``options`` once (a clear error for an unknown model, target or option)."""
    if options.dtype not in DTYPES:
        raise MlcwebError(f"unknown dtype {options.dtype!r}; choose one of {', '.join(DTYPES)}")
    if options.conv_layout not in mp.CONV_LAYOUTS:
        raise MlcwebError(f"unknown conv layout {options.conv_layout!r}; choose one of {', '.join(mp.CONV_LAYOUTS)}")
    if options.webgpu_attention not in mp.WEBGPU_ATTENTION:
        choices = ", ".join(mp.WEBGPU_ATTENTION)
        raise MlcwebError(f"unknown webgpu attention kernel {options.webgpu_attention!r}; choose one of {choices}")
    registered = host.model(model)
    config = {**registered.spec.default_config, **options.config}
    target_info = resolve_target(options.target, arch=options.arch, link=link)
    if target_info.name == "webgpu" and options.webgpu_subgroup_size:
        with_subgroups(target_info, options.webgpu_subgroup_size)  # a bad size fails before the import
    target = target_info.tvm_target()
    gpu = mp.gpu_facts(target) if mp.is_gpu_target(target) else None
    matrix = MatrixConfig() if options.webgpu_matrix and target_info.name == "webgpu" else None
    pipeline = mp.PipelineOptions(
        dtype=options.dtype,
        conv_layout=options.conv_layout,
        database=options.database,
        gpu=gpu,
        webgpu_matrix=matrix,
        webgpu_attention=options.webgpu_attention,
        webgpu_matrix_tiles=options.webgpu_matrix_tiles or TILE_ORDER,
    )
    return ModelBuild(model, registered, config, options, target_info, pipeline)


def build_phases(host: PluginHost, resolved: ModelBuild) -> dict[str, tvm.transform.Sequential]:
    """The pipeline's phases for ``resolved``, each with the passes the model's plugin adds to it."""
    context = resolved.phase_context()
    extra = {phase: host.phase_passes(resolved.name, phase=phase, context=context) for phase in mp.PHASES}
    return mp.phases(resolved.target, resolved.pipeline, {k: v for k, v in extra.items() if v})


def _import(host: PluginHost, resolved: ModelBuild, *, params: bool = True) -> tuple[ImportedModel, bool]:
    """The model imported by its plugin, or from the import cache (without its weights unless ``params``:
    a plan needs only the graph, and an SDXL's float32 weights fill a small machine's memory)."""
    options = resolved.options
    import_options = ImportOptions(model_path=options.model_path, dtype=options.dtype, config=resolved.config)
    if options.model_path is not None and not options.model_path.exists():
        raise MlcwebError(f"model folder {options.model_path} does not exist; pass --model with an existing folder")
    cache = ImportCache()
    spec = resolved.registered.spec
    digest = host.source_digest(resolved.registered.plugin)
    key = cache_key(resolved.name, resolved.config, import_options, digest, spec.file_options)
    if options.use_cache:
        cached = cache.load(key, params=params)
        if cached is not None:
            log.info("import cache hit %s", key)
            return cached, True
    with warnings.catch_warnings():
        if not log.isEnabledFor(logging.DEBUG):  # torch.export's own deprecation, nothing a user can act on
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        imported = host.import_model(resolved.name, import_options)
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


def _lift(
    imported: ImportedModel, weights_phase: tvm.transform.Pass, target: tvm.target.Target
) -> tuple[tvm.IRModule, dict[str, OrderedDict[str, tvm.runtime.Tensor]]]:
    with target:
        mod = weights_phase(imported.mod)
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


def lower_until(host: PluginHost, resolved: ModelBuild, until: str) -> tvm.IRModule:
    """The model imported, lifted and run through the phases after ``weights`` through ``until``: what
    ``mlcweb tune`` extracts kernels from (``until="kernels"``) and benchmarks profile."""
    imported, _ = _import(host, resolved)
    phases = build_phases(host, resolved)
    deploy, _weights = _lift(imported, phases["weights"], resolved.target)
    names = mp.PHASES[1 : mp.PHASES.index(until) + 1]
    with resolved.target, tvm.transform.PassContext(config=_pass_config(resolved)):
        return tvm.transform.Sequential([phases[n] for n in names])(deploy)


def _pass_config(resolved: ModelBuild) -> dict[str, Any]:
    """PassContext config of lowering and compiling: CUDA graphs where asked for, and on sm_80+ the
    asynchronous global-to-shared copies (cp.async) of the tensor-core tiles."""
    target = resolved.target
    config: dict[str, Any] = mp.async_copy_config(target)
    if target.kind.name == "cuda":
        config["relax.backend.use_cuda_graph"] = resolved.options.cuda_graph
    return config


def _lower(
    mod: tvm.IRModule, resolved: ModelBuild, phases: dict[str, tvm.transform.Sequential]
) -> tuple[tvm.IRModule, int, mp.ScheduleReport, dict[str, mp.FunctionMemory]]:
    with resolved.target, tvm.transform.PassContext(config=_pass_config(resolved)):
        planned = _planned(mod, phases)
        report = mp.schedule_report(planned)
        memory = mp.memory_report(planned)
        lowered = phases["finalize"](planned)
    return lowered, mp.count_kernels(lowered), report, memory


def _planned(mod: tvm.IRModule, phases: dict[str, tvm.transform.Sequential]) -> tvm.IRModule:
    """``mod`` (lifted) through the phases up to memory planning (under the caller's target and pass
    context)."""
    planning = [phases[name] for name in ("graph", "fuse", "kernels", "schedule", "memory")]
    return tvm.transform.Sequential(planning)(mod)


@dataclass
class MemoryPlan:
    """What a build holds in device memory, from its plan alone (:func:`plan_memory`).

    ``weight_bytes``: each function's deploy weights (after lifting: float16 where the build converts
    them); ``stored_weight_bytes``: all of them, a weight that several functions take (a batch-one and a
    batch-two UNet) counted once: the build stores such a weight once, found by content, and a plan
    without weights finds it by name, shape and dtype; ``functions``: each function's planned blocks.
    """

    model: str
    target: str
    dtype: str
    weight_bytes: dict[str, int]
    stored_weight_bytes: int
    functions: dict[str, mp.FunctionMemory]

    @property
    def largest_block_bytes(self) -> int:
        return max((m.largest_bytes for m in self.functions.values()), default=0)

    @property
    def peak_bytes(self) -> int:
        """Weights plus every function's planned blocks: the Relax VM's pooled allocator keeps a call's
        blocks for the next call, so a session that runs every function holds them all (blocks of equal
        size are shared, so this is an upper bound)."""
        return self.stored_weight_bytes + sum(m.planned_bytes for m in self.functions.values())

    def summary(self) -> str:
        mib = 2**-20
        lines = [f"memory plan of {self.model} for {self.target} ({self.dtype}); nothing written"]
        held = {n for n, b in self.weight_bytes.items() if b} | {n for n, m in self.functions.items() if m.storages}
        for name in sorted(held):
            line = f"  {name:<18} weights {self.weight_bytes.get(name, 0) * mib:9.1f} MiB"
            mem = self.functions.get(name)
            if mem is not None and mem.storages:
                planned, largest = mem.planned_bytes * mib, mem.largest_bytes * mib
                line += f", {planned:9.1f} MiB planned, largest block {largest:7.1f} MiB"
            lines.append(line)
        lines.append(f"  weights stored     {self.stored_weight_bytes * mib:9.1f} MiB")
        lines.append(f"  largest buffer     {self.largest_block_bytes * mib:9.1f} MiB")
        lines.append(f"  peak (weights + every planned block) {self.peak_bytes * mib:9.1f} MiB")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "target": self.target,
            "dtype": self.dtype,
            "weight_bytes": dict(self.weight_bytes),
            "stored_weight_bytes": self.stored_weight_bytes,
            "planned": {
                name: {"planned_bytes": m.planned_bytes, "largest_block_bytes": m.largest_bytes}
                for name, m in self.functions.items()
                if m.storages
            },
            "largest_block_bytes": self.largest_block_bytes,
            "peak_bytes": self.peak_bytes,
        }


def _weight_bytes(deploy: tvm.IRModule) -> tuple[dict[str, int], int]:
    """Each entry function's weight bytes (its parameters after ``num_input``) and all of them, counted
    once per (name, shape, dtype)."""
    per_function: dict[str, int] = {}
    stored: dict[tuple[str, tuple[int, ...], str], int] = {}
    for func in _entry_functions(deploy):
        f = deploy[func]
        names = mp.unique_param_names(f)
        total = 0
        for name, param in zip(names, f.params[int(f.attrs["num_input"]) :], strict=True):
            shape = tuple(int(d) for d in param.ty.shape)
            nbytes = math.prod(shape) * tvm.runtime.DataType(str(param.ty.dtype)).bits // 8
            stored[(name, shape, str(param.ty.dtype))] = nbytes
            total += nbytes
        per_function[func] = total
    return per_function, sum(stored.values())


def plan_memory(host: PluginHost, model: str, options: BuildOptions) -> MemoryPlan:
    """A build's memory from its plan: ``model`` imported (or its graph from the import cache), lifted
    and planned for ``options`` as :func:`build` would, without computing weights or compiling kernels.
    Minutes instead of a build's hour for a large model, and within a small machine's memory."""
    resolved = resolve(host, model, options, link=False)
    imported, _ = _import(host, resolved, params=False)
    phases = build_phases(host, resolved)
    with resolved.target:
        lifted = mp.split_transform_params(phases["weights"](imported.mod))
    weights, stored = _weight_bytes(lifted.deploy)
    with resolved.target, tvm.transform.PassContext(config=_pass_config(resolved)):
        memory = mp.memory_report(_planned(lifted.deploy, phases))
    functions = {name: memory[name] for name in _entry_functions(lifted.deploy) if name in memory}
    return MemoryPlan(model, resolved.target_info.name, options.dtype, weights, stored, functions)


def share_weights(
    weights: dict[str, OrderedDict[str, tvm.runtime.Tensor]],
) -> tuple[dict[str, tvm.runtime.Tensor], dict[str, list[str]]]:
    """The tensors to store, each once, and every function's weight names into them: functions that
    take the same weights (a model's batch-one and batch-two UNet) share one copy in the tensor cache,
    found by content (dtype, shape and bytes)."""
    stored: dict[str, tvm.runtime.Tensor] = {}
    by_content: dict[tuple[str, tuple[int, ...], str], str] = {}
    names: dict[str, list[str]] = {}
    for func in sorted(weights):
        names[func] = []
        for name, tensor in weights[func].items():
            array = tensor.numpy()
            key = (str(array.dtype), tuple(array.shape), hashlib.sha256(array.tobytes()).hexdigest())
            full = by_content.setdefault(key, f"{func}/{name}")
            if full == f"{func}/{name}":
                stored[full] = tensor
            names[func].append(full)
    return stored, names


def _functions_info(
    deploy: tvm.IRModule, params: dict[str, list[str]], ranges: dict[str, dict[str, tuple[int, int]]]
) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for func in sorted(params):
        f = deploy[func]
        n_in = int(f.attrs["num_input"])
        info[func] = {
            "inputs": [_input_spec(p, ranges.get(func, {}).get(p.name)) for p in f.params[:n_in]],
            "params": params[func],
        }
    return info


def _input_spec(param: relax.Var, value_range: tuple[int, int] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": param.name, "shape": [int(d) for d in param.ty.shape], "dtype": str(param.ty.dtype)}
    if value_range is not None:
        spec["range"] = [int(value_range[0]), int(value_range[1])]
    return spec


def _export(exe: relax.VMExecutable, path: Path, target: TargetInfo) -> None:
    if target.name == "webgpu":
        exe.export_library(str(path), fcompile=link_wasm)
    else:
        exe.export_library(str(path))


def _compile_library(lowered: tvm.IRModule, resolved: ModelBuild, path: Path) -> dict[str, Any]:
    """Compile ``lowered`` for ``resolved``'s target into the library ``path``. For webgpu, every shader is
    first checked with Dawn (a shader WebGPU rejects is a build error, not a page error), and the result
    is what the kernels need of a workgroup (the manifest's ``webgpu``), with ``matrix`` where the
    build planned subgroup-matrix kernels (:func:`_matrix_kernels`); else nothing."""
    with tvm.transform.PassContext(config=_pass_config(resolved)):
        tir = mp.tir_pipeline(resolved.target, resolved.pipeline)
        exe = tvm.compile(lowered, resolved.target, relax_pipeline=None, tir_pipeline=tir)
    needs: dict[str, Any] = {}
    if resolved.target_info.name == "webgpu":
        check_wgsl(exe.mod, float16=resolved.pipeline.dtype == "float16")
        sources = wgsl_sources(exe.mod)
        needs = dict(workgroup_needs(sources).manifest())
        matrix = _matrix_kernels(lowered, resolved, sources, path)
        if matrix:
            needs["matrix"] = matrix
    _export(exe, path, resolved.target_info)
    return needs


def _matrix_kernels(lowered: tvm.IRModule, resolved: ModelBuild, sources: dict[str, str], path: Path) -> dict[str, Any]:
    """The subgroup-matrix kernels planned for ``lowered`` (GEMMs by
    :class:`mlcweb_passes.webgpu.matrix_gemm.PlanMatrixGemms`, flash attentions by
    :class:`mlcweb_passes.webgpu.matrix_attention.PlanMatrixAttention`), written beside the library
    ``path`` as ``<library>-matrix.json`` ({shader: {code, grid}}); returns the manifest's ``matrix`` entry
    (file, counts, configuration, what the kernels need of a workgroup), or {} when none. Where the GEMMs
    were also planned for more workgroup memory (``PipelineOptions.webgpu_matrix_larger``) and those
    kernels differ, each such table is written too (``<library>-matrix-<bytes>.json``) and listed in the
    entry's ``larger``, for the page to take on adapters that grant what it declares."""
    config = resolved.pipeline.webgpu_matrix
    if config is None:
        return {}
    entry, base = _matrix_table(lowered, config, sources, path.parent / f"{path.stem}-matrix.json")
    if not entry:
        return {}
    larger = []
    for size in sorted(resolved.pipeline.webgpu_matrix_larger):
        attr = plans_attr(size)
        if lowered.attrs is None or attr not in lowered.attrs:
            continue
        dest = path.parent / f"{path.stem}-matrix-{size}.json"
        larger += [table] if (table := _matrix_table(lowered, config, sources, dest, attr, base)[0]) else []
    return {**entry, **({"larger": larger} if larger else {})}


def _matrix_table(
    lowered: tvm.IRModule,
    config: MatrixConfig,
    sources: dict[str, str],
    dest: Path,
    gemm_attr: str = PLANS_ATTR,
    unless: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One table of matrix kernels (the GEMMs planned in ``gemm_attr``, the attentions) checked with Dawn
    and written to ``dest``: its manifest entry (or {}, writing nothing, when it has no kernels or equals
    ``unless``) and the table."""
    gemms, attention = planned_kernels(lowered, sources, config, gemm_attr)
    kernels = {**gemms, **attention}
    table = {k.name: {"code": k.code, "grid": list(k.grid)} for k in kernels.values()}
    if not kernels or table == unless:
        return {}, table
    check_matrix_wgsl({k.name: k.code for k in kernels.values()})
    dest.write_text(json.dumps(table, sort_keys=True, indent=1) + "\n")
    log.info("%d GEMM and %d attention kernels on subgroup matrices in %s", len(gemms), len(attention), dest.name)
    entry = {
        "kernels": dest.name,
        "count": len(kernels),
        "gemms": len(gemms),
        "attention": len(attention),
        "config": config.manifest(),
        **workgroup_needs({k.name: k.code for k in kernels.values()}).manifest(),
    }
    return entry, table


def _with_shipped_database(resolved: ModelBuild) -> tuple[ModelBuild, str | None]:
    """``resolved`` with the project's tuned database for its target where no ``--db`` was given (and the
    shipped ones are not turned off), and the manifest's note of which database applied."""
    options = resolved.options
    if options.database is not None:
        return resolved, "--db"
    shipped = shipped_database(resolved.target_info) if options.use_shipped_database else None
    if shipped is None:
        return resolved, None
    log.info("applying the shipped database %s", shipped.name)
    return (
        dataclasses.replace(
            resolved,
            options=dataclasses.replace(options, database=shipped),
            pipeline=dataclasses.replace(resolved.pipeline, database=shipped),
        ),
        f"shipped:{shipped.name}",
    )


def build(
    host: PluginHost,
    model: str,
    options: BuildOptions,
    *,
    progress: bool = True,
    before_rename: Callable[[Path], None] | None = None,
) -> BuildResult:
    """Build ``model`` as ``options`` say; see the module docstring for what lands in ``options.out``."""
    resolved, database_note = _with_shipped_database(resolve(host, model, options))
    out = options.out.absolute()
    tmp = _prepare_out(out)
    info = resolved.target_info
    with_variant = info.name == "webgpu" and options.dtype == "float16" and options.webgpu_fallback
    names = ["import", "lift", "lower", "compile", "weights", "assets", "manifest"]
    if info.name == "webgpu" and options.webgpu_subgroup_size:
        names.insert(names.index("compile") + 1, "subgroup library")
    if with_variant:
        names.insert(-1, "float32 variant")
    with Interrupts() as interrupts:
        stages = _Stages(names, progress, interrupts)
        try:
            result = _build_into(host, resolved, tmp, stages, with_variant)
            with stages.stage("manifest"):
                write_manifest(tmp, result.files, {**result.manifest_info, "database": database_note})
            if before_rename is not None:
                before_rename(tmp)
            interrupts.check()  # the old output stays unless the build ran to the end
            _replace_dir(tmp, out)
        finally:
            stages.close()
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    manifest = json.loads((out / MANIFEST).read_text())
    return BuildResult(
        out, manifest, stages.seconds, result.kernels, result.memory, result.schedules, result.from_cache
    )


@dataclass
class _Built:
    files: list[str]
    manifest_info: dict[str, Any]
    kernels: int
    memory: dict[str, mp.FunctionMemory]
    schedules: mp.ScheduleReport
    from_cache: bool


def _build_into(host: PluginHost, resolved: ModelBuild, tmp: Path, stages: _Stages, with_variant: bool) -> _Built:
    """Every stage but the manifest, writing into ``tmp``."""
    options, info, target = resolved.options, resolved.target_info, resolved.target
    with stages.stage("import"):
        imported, from_cache = _import(host, resolved)
    phases = build_phases(host, resolved)
    with stages.stage("lift"):
        deploy, weights = _lift(imported, phases["weights"], target)
    with stages.stage("lower"):
        lowered, kernels, schedules, memory = _lower(deploy, resolved, phases)
    with stages.stage("compile"):
        library = f"{resolved.name}-{info.name}{info.library_suffix}"
        device_needs = _compile_library(lowered, resolved, tmp / library)
    subgroups: dict[str, Any] = {}
    if info.name == "webgpu" and options.webgpu_subgroup_size:
        with stages.stage("subgroup library"):
            subgroups = _subgroup_library(host, resolved, deploy, tmp)
    with stages.stage("weights"):
        flat, param_names = share_weights(weights)
        files = [
            library,
            *([subgroups["library"]] if subgroups else []),
            *matrix_files(device_needs, subgroups.get("webgpu", {})),
            *write_tensor_cache(flat, tmp, encoding=options.weight_encoding),
        ]
    with stages.stage("assets"):
        files += host.write_assets(resolved.name, out_dir=tmp, target=target, options=options, imported=imported)
        if info.name == "webgpu":
            files += write_web_runtime(tmp)
    variants = {}
    if with_variant:
        with stages.stage("float32 variant"):
            files += _float32_variant(host, resolved.name, options, tmp)
            variants["float32"] = f"{FLOAT32_VARIANT}/"
    manifest_info = {
        "model": resolved.name,
        "plugin": resolved.registered.plugin,
        "config": resolved.config,
        "target": info.name,
        "tvm_target": {"target": info.kind, "host": info.host},
        "device": info.device,
        "dtype": options.dtype,
        "conv_layout": resolved.conv_layout,
        "weight_encoding": options.weight_encoding,
        "library": library,
        "functions": _functions_info(deploy, param_names, imported.input_ranges),
        # what a WebGPU page must be allowed to bind: each function's planned blocks (activations)
        "memory": {
            name: {"planned_bytes": mem.planned_bytes, "largest_block_bytes": mem.largest_bytes}
            for name, mem in sorted(memory.items())
            if mem.storages
        },
        # what its kernels need of the device's limits (the page asks for these, or says what is short)
        **({"webgpu": device_needs} if device_needs else {}),
        # the same functions with subgroup reductions, for adapters whose subgroups are exactly that wide
        **({"subgroups": subgroups} if subgroups else {}),
        "metadata": imported.metadata,
        "variants": variants,
    }
    return _Built(files, manifest_info, kernels, memory, schedules, from_cache)


def matrix_files(*needs: dict[str, Any]) -> list[str]:
    """The subgroup-matrix kernel files (each table's) of the libraries whose workgroup needs are
    ``needs`` (the manifest's ``webgpu`` entries)."""
    matrices = [entry["matrix"] for entry in needs if "matrix" in entry]
    return [table["kernels"] for matrix in matrices for table in (matrix, *matrix.get("larger", ()))]


def _subgroup_library(host: PluginHost, resolved: ModelBuild, deploy: tvm.IRModule, tmp: Path) -> dict[str, Any]:
    """Lower and compile ``deploy`` again for the webgpu target with subgroups of the build's size into
    ``tmp``: the same functions, weights and memory plan, reductions through subgroup operations. Returns
    the manifest's ``subgroups`` entry (library, subgroup size, workgroup needs)."""
    size = resolved.options.webgpu_subgroup_size
    variant = dataclasses.replace(resolved, target_info=with_subgroups(resolved.target_info, size))
    lowered, _, _, _ = _lower(deploy, variant, build_phases(host, variant))
    library = f"{resolved.name}-{variant.target_info.name}-subgroups{variant.target_info.library_suffix}"
    return {"library": library, "subgroup_size": size, "webgpu": _compile_library(lowered, variant, tmp / library)}


def _float32_variant(host: PluginHost, model: str, options: BuildOptions, tmp: Path) -> list[str]:
    """Build the float32 variant of a webgpu float16 build into ``tmp/float32``: the page loads it when
    the adapter lacks shader-f16. Returns its files relative to ``tmp``, for the outer manifest."""
    inner = dataclasses.replace(options, dtype="float32", out=tmp / FLOAT32_VARIANT, webgpu_fallback=False)
    result = build(host, model, inner, progress=False)
    return [f"{FLOAT32_VARIANT}/{entry['path']}" for entry in result.manifest["files"]] + [
        f"{FLOAT32_VARIANT}/{MANIFEST}"
    ]


def _prepare_out(out: Path) -> Path:
    """Check that ``out`` may receive a build (it is new, empty or an mlcweb build: nothing a user owns is
    replaced), remove what killed builds left beside it, and create the temporary folder the build writes
    into (readable by others, as a web server running as another user needs)."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise MlcwebError(f"--out {out} is a file, not a folder; pass a folder path for the build")
        try:
            occupied = any(out.iterdir())
        except OSError as err:
            raise MlcwebError(f"cannot read --out {out} ({err.strerror}); pass a folder you can write") from err
        if occupied and not is_mlcweb_build(out):
            raise MlcwebError(
                f"--out {out} is a folder that is not an mlcweb build (it has no manifest.json written by mlcweb); "
                "mlcweb replaces only its own builds: pass a new or empty folder"
            )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for kind in ("tmp", "old"):
            remove_stale(out.parent, f".{out.name}.{kind}-")
        tmp = make_temp_dir(out.parent, f".{out.name}.tmp-")
    except OSError as err:
        raise MlcwebError(f"cannot write a build beside {out} ({err.strerror}); pass a folder you can write") from err
    return tmp


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``, replacing an existing ``out`` (an mlcweb build or an empty folder, as
    :func:`_prepare_out` checked) only once ``tmp`` is complete."""
    if out.exists():
        if any(out.iterdir()) and not is_mlcweb_build(out):  # changed since the build started
            raise MlcwebError(
                f"--out {out} became a folder that is not an mlcweb build while building; nothing replaced"
            )
        old = out.with_name(f".{out.name}.old-{os.getpid()}-0")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)

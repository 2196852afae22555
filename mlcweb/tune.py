"""``mlcweb tune``: tune a model's kernels with MetaSchedule into a JSON database builds apply.

Tasks are the PrimFuncs the build compiles: the model is imported, lifted and run through the
``mlcweb_passes`` pipeline up to scheduling (the same fusion the build does), and each entry function's
kernels are extracted with ``meta_schedule.relax_integration.extract_tasks``. A kernel's weight is how
often it runs for one use of the model: calls per function times the plugin's ``runs_per_use`` (for
Stable Diffusion, the UNet's kernels run once per denoising step).

Each task is tuned on its own (``meta_schedule.tune_tasks`` with one task), heaviest first, so progress,
resuming and interrupting work per task:

- the database (``database_workload.json`` + ``database_tuning_record.json`` in ``--db``) is only ever
  appended to: records of earlier runs stay, and a task that already has ``--trials`` valid records is
  skipped (as is one whose search space ran out before that, noted in ``mlcweb-tune.json``); an
  interrupted run (Ctrl-C) keeps every record measured so far;
- builders run in parallel local processes; the runner is the local device, or, with ``--rpc-tracker``,
  every server registered under ``--rpc-key`` with a TVM RPC tracker, one measurement per server at a
  time (a server that dies fails only the candidates it was running);
- before tuning a task, its default (dlight / ``CPUParallel``) schedule is measured the same way, so the
  summary gives fallback time, tuned time and each kernel's share of one use, fallback and tuned.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import importlib
import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.analysis import estimate_tir_flops

import mlcweb_passes as mp
from mlcweb_passes.schedules.apply_database import preload_tensor_intrinsics

from .build import lower_until, resolve
from .databases import open_database
from .errors import MlcwebError
from .interrupts import Interrupts
from .model import BuildOptions
from .plugins import PluginHost
from .targets import TargetInfo, resolve_target

__all__ = [
    "Task",
    "TaskResult",
    "TuneOptions",
    "extract_tuning_tasks",
    "stop_popen_workers",
    "summary_table",
    "tune",
]

log = logging.getLogger(__name__)

STATIC_SHARED_BYTES = 48 * 1024  # CUDA's limit on a block's static shared memory


@dataclass(frozen=True)
class TuneOptions:
    """What ``mlcweb tune`` was asked to do: ``build`` says what the kernels are (model folder, target,
    dtype, config; its ``out`` is unused), ``db`` where records go; ``trials``: valid measured schedules
    per task."""

    build: BuildOptions
    db: Path
    trials: int = 64
    tasks: str | None = None
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    builders: int | None = None
    trials_per_round: int = 16
    seed: int = 0
    # "evolutionary" (cost-model guided, the default) or "replay-trace" (random samples, much cheaper
    # per trial: for smoke runs and tests)
    search: str = "evolutionary"
    max_tasks: int | None = None  # only the N heaviest tasks (runs per use x FLOPs)
    # False: keep the GEMMs WgmmaGemm takes on sm_90 among the tasks (the build does not schedule them)
    wgmma: bool = True


@dataclass
class Task:
    """One kernel to tune: its name, the IRModule holding it as ``main``, and its runs per use."""

    name: str
    mod: tvm.IRModule
    weight: float
    extracted: Any  # ms.ExtractedTask


@dataclass
class TaskResult:
    name: str
    weight: float
    fallback_s: float | None
    tuned_s: float | None
    trials: int
    status: str  # "tuned", "skipped (done)", "interrupted", "failed"


def tuning_target(info: TargetInfo) -> tvm.target.Target:
    """The target tasks are tuned for: the build target, with ``num-cores`` for llvm (MetaSchedule's CPU
    rules need it)."""
    if info.name == "llvm":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return tvm.target.Target({**info.kind, "num-cores": cores})
    if info.name == "cuda":
        # MetaSchedule's GPU rules need the thread and shared-memory limits; its kernels take static
        # shared memory, which CUDA caps at 48 KiB without the dynamic opt-in
        gpu = mp.gpu_facts(info.tvm_target())
        limits = {
            "max_threads_per_block": gpu.max_threads,
            "max_shared_memory_per_block": min(gpu.max_shared_bytes, STATIC_SHARED_BYTES),
            "thread_warp_size": 32,
        }
        return tvm.target.Target({**limits, **info.kind}, host=info.host)
    if info.name == "webgpu":
        # Measured natively on CUDA (no browser can run MetaSchedule's runner) within what WebGPU allows:
        # 256 threads per workgroup, 16 KB of workgroup memory, no warp shuffles; and the search space
        # has no tensor-core rules (WGSL has no matrix intrinsics): see _space().
        limits = {
            "max_threads_per_block": 256,
            "max_num_threads": 256,
            "max_shared_memory_per_block": 16384,
            "thread_warp_size": 1,
        }
        return tvm.target.Target({"kind": "cuda", "arch": "sm_90", **limits})
    return info.tvm_target()


def _space(options: TuneOptions) -> Any:
    """MetaSchedule's search space: CUDA float16 builds search tensor-core schedules too."""
    if options.build.target == "cuda" and options.build.dtype == "float16":
        return ms.space_generator.PostOrderApply(
            sch_rules="cuda-tensorcore", postprocs="cuda-tensorcore", mutator_probs="cuda-tensorcore"
        )
    return "post-order-apply"


def extract_tuning_tasks(host: PluginHost, model: str, options: TuneOptions) -> tuple[list[Task], tvm.target.Target]:
    """The model's kernels after fusion, merged across functions, weighted by runs per use."""
    resolved = resolve(host, model, options.build, link=False)
    resolved = dataclasses.replace(resolved, pipeline=dataclasses.replace(resolved.pipeline, wgmma=options.wgmma))
    target = tuning_target(resolved.target_info)
    # The kernels the build compiles: lowered for the build target (for webgpu that differs from the
    # CUDA target the tasks are measured on).
    fused = lower_until(host, resolved, "kernels")
    runs = resolved.registered.spec.runs_per_use
    merged: dict[int, Task] = {}
    entries = [gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tvm.relax.Function)]
    for entry in sorted(entries):
        only = mp.RemoveUnusedFunctions([entry])(fused)
        for ext in ms.relax_integration.extract_tasks(only, target):
            if any(mp.is_scheduled(f) for f in ext.dispatched[0].functions.values()):
                continue  # hand-written kernels (flash attention) have nothing to tune
            key = tvm_ffi.structural_hash(ext.dispatched[0])
            weight = float(ext.weight) * runs.get(entry, 1)
            if key in merged:
                merged[key].weight += weight
            else:
                merged[key] = Task(ext.task_name, ext.dispatched[0], weight, ext)
    # Heaviest first: runs per use times estimated FLOPs, a stand-in for the share of one use.
    tasks = sorted(merged.values(), key=lambda t: (-t.weight * _flops(t.mod), t.name))
    if options.tasks:
        patterns = [p.strip() for p in options.tasks.split(",") if p.strip()]
        tasks = [t for t in tasks if any(fnmatch.fnmatch(t.name, p) for p in patterns)]
        if not tasks:
            raise MlcwebError(f"no task matches --tasks {options.tasks!r}; run without it to see the task names")
    tasks = [t for t in tasks if t.weight > 0 or options.tasks]
    return (tasks[: options.max_tasks] if options.max_tasks else tasks), target


def build_candidate(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    params: Any,
    *,
    config: dict[str, Any] | None = None,
    wgsl: dict[str, Any] | None = None,
) -> tvm.runtime.Module:
    """MetaSchedule's default build of one candidate under the PassContext ``config`` (a build's
    :func:`mlcweb_passes.async_copy_config`). Runs in the builder's worker processes.

    ``wgsl``: the WebGPU target (as a config dict) a webgpu build will compile the schedule for. Tuning
    for WebGPU measures candidates natively; each is also compiled for WebGPU and its WGSL handed to Dawn
    (:func:`mlcweb.wgsl_check.check_wgsl`), so a schedule no browser accepts fails here, as a candidate
    that does not build, and never reaches the database."""
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build

    if wgsl is not None:
        from .wgsl_check import check_wgsl

        check_wgsl(tvm.tirx.build(mod, target=tvm.target.Target(wgsl["target"], host=wgsl["host"])))
    with tvm.transform.PassContext(config=config or {}):
        built: tvm.runtime.Module = default_build(mod, target, params)
    return built


def _wgsl_target(options: TuneOptions) -> dict[str, Any] | None:
    """For webgpu tuning, the target each candidate's WGSL is checked for (a dict: it crosses processes)."""
    if options.build.target != "webgpu":
        return None
    info = resolve_target("webgpu", link=False)
    return {"target": info.kind, "host": info.host}


def _flops(mod: tvm.IRModule) -> float:
    try:
        return max(1.0, float(estimate_tir_flops(mod)))
    except Exception:  # shapes it cannot count (data-dependent loops)
        return 1.0


def _rpc_runner(tracker: str, key: str | None) -> ms.runner.Runner:
    if not key:
        raise MlcwebError("--rpc-tracker needs --rpc-key, the key the servers registered under")
    host, _, port = tracker.rpartition(":")
    if not host or not port.isdigit():
        raise MlcwebError(f"--rpc-tracker {tracker!r} is not HOST:PORT")
    from tvm import rpc

    try:
        summary = rpc.connect_tracker(host, int(port)).summary()
    except Exception as err:  # connection refused, timeout
        raise MlcwebError(
            f"cannot reach the RPC tracker at {tracker}: {err}; start it with "
            "`python -m tvm.exec.rpc_tracker --port PORT`"
        ) from err
    queue = summary.get("queue_info", {}).get(key, {})
    servers = int(queue.get("free", 0)) + int(queue.get("pending", 0))
    if servers == 0:
        raise MlcwebError(
            f"no RPC server is registered under key {key!r} at {tracker}; start one per device with "
            f"`python -m tvm.exec.rpc_server --tracker {tracker} --key {key}`"
        )
    log.info("RPC: %d server(s) under key %r", servers, key)
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=key, session_timeout_sec=120)
    return ms.runner.RPCRunner(rpc_config=config, max_workers=servers)


def _runner(options: TuneOptions) -> ms.runner.Runner:
    if options.rpc_tracker:
        return _rpc_runner(options.rpc_tracker, options.rpc_key)
    return ms.runner.LocalRunner(timeout_sec=60)


def _mean(run_secs: Any) -> float | None:
    values = [float(x) for x in run_secs or []]
    return sum(values) / len(values) if values and all(math.isfinite(v) for v in values) else None


def default_schedule(task: Task, target: tvm.target.Target) -> Any:
    """The schedule a build for ``target`` gives the task without a database (first default rule that applies)."""
    for rule in mp.default_rules(target):
        space = rule.apply(task.mod["main"], target, False)
        if space is not None:
            return space[0] if isinstance(space, list) else space
    return None


def measure_default(
    task: Task,
    target: tvm.target.Target,
    builder: Any,
    runner: Any,
    db: ms.database.Database | None = None,
    build_target: tvm.target.Target | None = None,
) -> float | None:
    """Seconds per call of the task's default (fallback) schedule, measured like a tuning candidate.

    With ``db``, the default schedule also goes into the database as a tuning record with that time, so
    a build applies MetaSchedule's best only where it beats the default schedule.
    """
    sch = default_schedule(task, build_target or target)
    if sch is None:
        return None
    scheduled = tvm.IRModule({"main": sch.mod["main"].with_attr("tirx.is_scheduled", True)})
    (built,) = builder.build([ms.builder.BuilderInput(scheduled, target)])
    if built.error_msg:
        log.warning("default schedule of %s does not build: %s", task.name, built.error_msg[:300])
        return None
    args = ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])
    device = "cpu" if target.kind.name == "llvm" else target.kind.name
    (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, device, args)])
    result = future.result()
    if built.artifact_path:
        Path(built.artifact_path).unlink(missing_ok=True)
    if result.error_msg:
        log.warning("default schedule of %s failed to run: %s", task.name, result.error_msg[:300])
        return None
    seconds = _mean(result.run_secs)
    if db is not None and seconds is not None and not _has_record_of(db, task, sch.trace):
        workload = db.commit_workload(task.mod)
        db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [seconds], target, args))
    return seconds


def _has_record_of(db: ms.database.Database, task: Task, trace: Any) -> bool:
    text = str(trace)
    return any(str(r.trace) == text for r in _records(db, task, 1 << 16))


def _records(db: ms.database.Database, task: Task, k: int) -> list[Any]:
    if not db.has_workload(task.mod):  # do not commit workloads just to count their records
        return []
    return list(db.get_top_k(db.commit_workload(task.mod), k))


def detach_unnamed_tuning_log_handlers() -> None:
    """Work around MetaSchedule's logger set-up: it lists the handlers of ``tvm.s_tir.meta_schedule`` by
    name in a ``dictConfig``, and an unnamed handler there (left by an earlier configuration in the same
    process) makes it fail with "'NoneType' object has no attribute 'format'". Drop those handlers."""
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in [h for h in ms_logger.handlers if h.get_name() is None]:
        ms_logger.removeHandler(handler)


def _cost_model() -> str:
    """MetaSchedule's XGBoost cost model where xgboost is installed, random scores otherwise."""
    if importlib.util.find_spec("xgboost") is None:
        log.warning("xgboost is not installed: the search runs without a cost model (pip install xgboost)")
        return "random"
    return "xgb"


_STATE = "mlcweb-tune.json"


def _task_key(task: Task) -> str:
    return f"{task.name}:{tvm_ffi.structural_hash(task.mod)}"


def _load_state(db: Path) -> dict[str, dict[str, Any]]:
    path = db / _STATE
    data: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}
    return data


def _save_state(db: Path, state: dict[str, dict[str, Any]]) -> None:
    tmp = db / f".{_STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, db / _STATE)


def _done(have: list[Any], task: Task, state: dict[str, dict[str, Any]], trials: int) -> bool:
    """Enough valid records, or an earlier run found the space exhausted at this many trials or more."""
    return len(have) >= trials or state.get(_task_key(task), {}).get("exhausted_at", 0) >= trials


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """Reports trials done and the best time after each measured batch."""

    def __init__(self, report: Callable[[int, float | None], None]) -> None:
        super().__init__()
        self.report = report
        self.done = 0  # valid measurements
        self.candidates = 0  # candidates tried, failed builds and runs included
        self.best: float | None = None

    def apply(self, task_scheduler: Any, task_id: int, candidates: Any, builds: Any, runs: Any) -> None:
        self.candidates += len(runs)
        for result in runs:
            secs = _mean(result.run_secs) if not result.error_msg else None
            if secs is not None:
                self.done += 1
                self.best = secs if self.best is None else min(self.best, secs)
        self.report(self.done, self.best)


@dataclass
class _Session:
    """What every task of one ``tune`` call shares: where records go, how candidates are built and run,
    and the progress counters."""

    options: TuneOptions
    target: tvm.target.Target
    build_target: tvm.target.Target
    db: ms.database.Database
    builder: ms.builder.Builder
    runner: ms.runner.Runner
    state: dict[str, dict[str, Any]]
    total_trials: int
    echo: Callable[[str], None]
    started: float = field(default_factory=time.perf_counter)
    measured: int = 0


def _session(
    options: TuneOptions, tasks: list[Task], target: tvm.target.Target, echo: Callable[[str], None]
) -> _Session:
    db = open_database(options.db)
    # The builder's worker processes each import tvm.s_tir.tensor_intrin before building; preload it the
    # fast way (the builder restarts its workers for every batch, so this is paid per batch).
    # Candidates are built as `mlcweb build` builds: with cp.async on sm_80+ cuda (our tensor-core tiles'
    # default schedules depend on it; measured without, they would lose to slower candidates).
    build_target = resolve_target(options.build.target, arch=options.build.arch, link=False).tvm_target()
    builder = ms.builder.LocalBuilder(
        max_workers=options.builders or os.cpu_count() or 1,
        timeout_sec=300,
        initializer=preload_tensor_intrinsics,
        f_build=functools.partial(
            build_candidate, config=mp.async_copy_config(build_target), wgsl=_wgsl_target(options)
        ),
    )
    state = _load_state(options.db)
    total_trials = sum(
        0 if _done(have, t, state, options.trials) else options.trials - len(have)
        for t in tasks
        for have in [_records(db, t, options.trials)]
    )
    return _Session(options, target, build_target, db, builder, _runner(options), state, total_trials, echo)


def tune(
    host: PluginHost, model: str, options: TuneOptions, *, echo: Callable[[str], None] = print
) -> list[TaskResult]:
    """Tune ``model``'s kernels into ``options.db`` (see the module docstring); returns one result per task."""
    if options.trials < 1:
        raise MlcwebError("--trials must be at least 1")
    preload_tensor_intrinsics()
    tasks, target = extract_tuning_tasks(host, model, options)
    running_before = _children()
    session = _session(options, tasks, target, echo)
    echo(f"{len(tasks)} tasks for {target.kind.name}; {session.total_trials} trials to measure into {options.db}")
    results: list[TaskResult] = []
    interrupts = Interrupts()
    try:
        with interrupts:
            for index, task in enumerate(tasks, 1):
                results.append(_tune_task(session, task, f"[{index}/{len(tasks)}] {task.name}"))
    except (KeyboardInterrupt, RuntimeError) as err:
        # Ctrl-C while MetaSchedule waits in C++ on its builders reaches us as a RuntimeError.
        if isinstance(err, RuntimeError) and not interrupts.seen.is_set():
            raise
        if len(results) < len(tasks):
            task = tasks[len(results)]
            have = len(_records(session.db, task, options.trials))
            results.append(TaskResult(task.name, task.weight, None, None, have, "interrupted"))
        echo(f"interrupted: the {session.measured} measurements of this run are kept in {options.db}")
    finally:
        stop_popen_workers(keep=running_before)
    return results


def _children() -> set[int]:
    import psutil

    return {child.pid for child in psutil.Process().children()}


def stop_popen_workers(keep: set[int] | frozenset[int] = frozenset(), timeout: float = 3.0) -> int:
    """End the ``tvm.exec.popen_worker`` processes this process started itself, but those in ``keep``
    (MetaSchedule's builder and runner pools outlive ``tune_tasks``, about 500 MB each; an RPC server's
    or tracker's own workers are its children, not ours, and stay); returns how many were running."""
    import psutil

    workers = []
    for child in psutil.Process().children():
        try:
            if child.pid not in keep and "tvm.exec.popen_worker" in " ".join(child.cmdline()):
                workers.append(child)
                child.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(workers, timeout=timeout)
    for proc in alive:
        proc.kill()
    return len(workers)


def _tune_task(session: _Session, task: Task, head: str) -> TaskResult:
    """Measure ``task``'s default schedule, then search until it has ``trials`` valid records."""
    options, db = session.options, session.db
    have = _records(db, task, options.trials)
    fallback = measure_default(task, session.target, session.builder, session.runner, db, session.build_target)
    if _done(have, task, session.state, options.trials):
        session.echo(f"{head}: {len(have)} records already, skipped")
        return TaskResult(task.name, task.weight, fallback, _mean(have[0].run_secs), len(have), "skipped (done)")
    todo = options.trials - len(have)
    before = session.measured

    def report(done: int, best: float | None) -> None:
        rate = (time.perf_counter() - session.started) / max(1, before + done)
        left = rate * max(0, session.total_trials - before - done)
        best_txt = f"{best * 1e3:.3f} ms" if best is not None else "-"
        session.echo(f"{head}: {done}/{todo} trials, best {best_txt}, ~{left:.0f} s left")

    progress = _Progress(report)
    detach_unnamed_tuning_log_handlers()
    contexts, _ = ms.relax_integration.extracted_tasks_to_tune_contexts(
        [task.extracted], str(options.db / "logs"), space=_space(options), strategy=options.search, seed=options.seed
    )
    try:
        ms.tune_tasks(
            tasks=contexts,
            task_weights=[1.0],
            work_dir=str(options.db / "logs"),
            max_trials_global=todo,
            max_trials_per_task=todo,
            num_trials_per_iter=min(options.trials_per_round, todo),
            builder=session.builder,
            runner=session.runner,
            database=db,
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), progress],
            task_scheduler="round-robin",
            cost_model=_cost_model(),
        )
    finally:
        session.measured += progress.done
    best = _records(db, task, 1)
    result = TaskResult(task.name, task.weight, fallback, _mean(best[0].run_secs) if best else None, 0, "")
    result.trials = len(_records(db, task, options.trials))
    result.status = "tuned" if progress.done else "failed (no candidate built and ran)"
    if progress.done and progress.candidates < todo:
        # The search ran out of new candidates: the space is smaller than --trials. Remember it, so a
        # re-run does not search it again.
        session.state.setdefault(_task_key(task), {})["exhausted_at"] = options.trials
        _save_state(options.db, session.state)
        result.status = "tuned (space exhausted)"
    return result


def summary_table(results: list[TaskResult]) -> str:
    """Per task: runs per use, fallback and tuned time, speed-up, and its share of one use."""

    def ms_(x: float | None) -> str:
        return f"{x * 1e3:.4f}" if x is not None else "-"

    fallback_total = sum(r.weight * (r.fallback_s or 0.0) for r in results)
    tuned_total = sum(r.weight * (r.tuned_s or r.fallback_s or 0.0) for r in results)
    lines = [
        "| task | runs/use | fallback ms | tuned ms | speed-up | share (fallback) | share (tuned) | trials | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        speed = f"{r.fallback_s / r.tuned_s:.2f}x" if r.fallback_s and r.tuned_s else "-"
        share_f = r.weight * (r.fallback_s or 0.0) / fallback_total if fallback_total else 0.0
        share_t = r.weight * (r.tuned_s or r.fallback_s or 0.0) / tuned_total if tuned_total else 0.0
        lines.append(
            f"| {r.name} | {r.weight:g} | {ms_(r.fallback_s)} | {ms_(r.tuned_s)} | {speed} | "
            f"{share_f:.1%} | {share_t:.1%} | {r.trials} | {r.status} |"
        )
    lines.append(
        f"| **all kernels, one use** | | {fallback_total * 1e3:.3f} | {tuned_total * 1e3:.3f} | "
        f"{(fallback_total / tuned_total if tuned_total else 0):.2f}x | 100% | 100% | | |"
    )
    return "\n".join(lines)

"""MetaSchedule database application with a default-schedule fallback, and a report of which was used.

A tuning run (``tvm.s_tir.meta_schedule``) records, per PrimFunc workload, the best schedule it
measured. At build time the schedules must be applied where a record matches (same workload, same
target) and every other PrimFunc still needs *a* schedule: GPU code without thread bindings does not
build, and unscheduled CPU code runs on one core. :class:`ApplyDatabase` runs
``relax.transform.MetaScheduleApplyDatabase`` under the database and target, marks what it scheduled
``mlcweb.schedule = "tuned"``, then schedules the rest with
:class:`~mlcweb_passes.schedules.default_schedule.DefaultSchedule`. :func:`schedule_report` tells which was which.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass

import tvm
from tvm import relax, tirx
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from .._relax import ModulePassBase
from .._tir import HAND_WRITTEN, SOURCE_ATTR
from ..targets import GpuFacts
from ..webgpu.gemm import WebGPUTile
from .default_schedule import DefaultSchedule, is_scheduled

__all__ = ["ApplyDatabase", "ScheduleReport", "load_database", "schedule_report"]


def load_database(database: ms.Database | str | os.PathLike[str]) -> ms.Database:
    """A MetaSchedule database, or a directory holding ``database_workload.json`` and
    ``database_tuning_record.json`` (the layout ``ms.tune_tir`` and ``mlcweb tune`` write)."""
    if isinstance(database, ms.Database):
        return database
    path = os.fspath(database)
    workload = os.path.join(path, "database_workload.json")
    records = os.path.join(path, "database_tuning_record.json")
    missing = [p for p in (workload, records) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{path!r} is not a MetaSchedule JSON database: missing {', '.join(missing)}; "
            "pass the directory a tuning run wrote (its work_dir)"
        )
    with open(records, "rb") as f:
        if b"tensorize" in f.read():  # traces name tensor intrinsics: they must be registered to parse
            preload_tensor_intrinsics()
    return ms.database.JSONDatabase(path_workload=workload, path_tuning_record=records, allow_missing=False)


def preload_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (every TuneContext needs it) in seconds instead of minutes.

    That package defines hundreds of ``@T.prim_func``s, and TVMScript's parser calls ``inspect.stack()``
    for each. Under an import, the stack holds ``<frozen importlib._bootstrap>`` frames that
    ``inspect.getmodule`` never finds, so every lookup scans all of ``sys.modules`` again: about a minute
    on 2 cores with only TVM loaded, four with torch and diffusers. Remembering the misses for the
    duration of the import makes it ~5 s; the parser only uses the frames, not their modules.
    """
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.getmodule
    misses: set[str] = set()

    def getmodule(obj: object, _filename: str | None = None) -> types.ModuleType | None:
        if _filename is not None and _filename in misses:
            return None
        module = original(obj, _filename)
        if module is None and _filename is not None:
            misses.add(_filename)
        return module

    inspect.getmodule = getmodule  # type: ignore[assignment]
    try:
        importlib.import_module("tvm.s_tir.tensor_intrin")
    finally:
        inspect.getmodule = original


@dataclass(frozen=True)
class ScheduleReport:
    """PrimFunc names by where their schedule came from."""

    tuned: tuple[str, ...]
    default: tuple[str, ...]
    unscheduled: tuple[str, ...]
    hand_written: tuple[str, ...] = ()  # kernels written scheduled, such as flash attention

    def summary(self) -> str:
        written = f"{len(self.hand_written)} hand-written, " if self.hand_written else ""
        return f"{len(self.tuned)} tuned, {len(self.default)} default, {written}{len(self.unscheduled)} unscheduled"


@tvm.transform.module_pass(opt_level=0, name="mlcweb.ApplyDatabase")
class ApplyDatabase(ModulePassBase):
    """Apply ``database`` where it has records, default schedules elsewhere (``database=None``: only
    the default schedules, sized for ``gpu`` on GPU targets; WebGPU GEMMs tiled as the tile table
    ``tiles`` says for the shapes it holds)."""

    def __init__(
        self,
        target: Target,
        database: ms.Database | str | os.PathLike[str] | None = None,
        gpu: GpuFacts | None = None,
        tiles: Mapping[str, WebGPUTile] | None = None,
    ) -> None:
        self.target = target
        self.database = load_database(database) if database is not None else None
        self.gpu = gpu
        self.tiles = tiles

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with self.target:
            if self.database is not None:
                before = {gv.name_hint for gv, f in mod.functions_items() if is_scheduled(f)}
                with self.database:
                    mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod).clone()
                for gv, func in list(mod.functions_items()):
                    if is_scheduled(func) and gv.name_hint not in before:
                        mod[gv] = func.with_attr(SOURCE_ATTR, "tuned")
            return DefaultSchedule(self.target, self.gpu, self.tiles)(mod)


def schedule_report(mod: tvm.IRModule) -> ScheduleReport:
    """Which PrimFuncs of ``mod`` were tuned, got a default schedule, were written scheduled
    (``mlcweb.schedule = "hand-written"``), or have none."""
    groups: dict[str, list[str]] = {"tuned": [], "default": [], HAND_WRITTEN: [], "": []}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        source = str(func.attrs[SOURCE_ATTR]) if func.attrs is not None and SOURCE_ATTR in func.attrs else ""
        groups.get(source, groups[""]).append(gv.name_hint)
    tuned, default, written, none = (tuple(sorted(groups[k])) for k in ("tuned", "default", HAND_WRITTEN, ""))
    return ScheduleReport(tuned, default, none, written)

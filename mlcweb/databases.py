"""Tuned MetaSchedule databases shipped with mlcweb, one per device class, applied by default.

``mlcweb/databases/<name>/`` holds ``database_workload.json`` and ``database_tuning_record.json`` as
``mlcweb tune`` writes them. A build for a target uses the database named after it (``llvm-x86_64``,
``cuda-sm_90``, ``webgpu``) when one is shipped; ``--db DIR`` replaces it and ``--no-db`` builds with the
default schedules only. Workloads are matched structurally, so one database serves every model whose
kernels it has seen; kernels it has not seen get the default schedules.
"""

from __future__ import annotations

import platform
from pathlib import Path

from .targets import TargetInfo

__all__ = ["DATABASES_DIR", "shipped_database", "shipped_database_name"]

DATABASES_DIR = Path(__file__).resolve().parent / "databases"


def shipped_database_name(info: TargetInfo) -> str:
    """The device class a target's tuned schedules are filed under."""
    if info.name == "llvm":
        return f"llvm-{platform.machine()}"
    if info.name == "cuda":
        return f"cuda-{info.kind.get('arch', 'sm_90')}"
    return info.name


def shipped_database(info: TargetInfo) -> Path | None:
    """The shipped database directory for ``info``, or None when mlcweb ships none for it."""
    path = DATABASES_DIR / shipped_database_name(info)
    return path if (path / "database_tuning_record.json").is_file() else None

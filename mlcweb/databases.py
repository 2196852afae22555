"""Tuned MetaSchedule databases shipped with mlcweb, one per device class, applied by default.

``mlcweb/databases/<name>/`` holds ``database_workload.json`` and ``database_tuning_record.json`` as
``mlcweb tune`` writes them. A build for a target uses the database named after it (``llvm-x86_64``,
``cuda-sm_90``, ``webgpu``) when one is shipped; ``--db DIR`` replaces it and ``--no-db`` builds with the
default schedules only. Workloads are matched structurally, so one database serves every model whose
kernels it has seen; kernels it has not seen get the default schedules.
"""

from __future__ import annotations

import logging
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

import mlcweb_passes as mp

from .targets import TargetInfo

__all__ = [
    "DATABASES_DIR",
    "compact_database",
    "compiles_for",
    "open_database",
    "shipped_database",
    "shipped_database_name",
]

log = logging.getLogger(__name__)

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


def open_database(path: Path) -> ms.database.JSONDatabase:
    """The JSON database in directory ``path``, created empty when it does not exist (to write into)."""
    path.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(
        path_workload=str(path / "database_workload.json"),
        path_tuning_record=str(path / "database_tuning_record.json"),
        allow_missing=True,
    )


def compiles_for(target: Any) -> Callable[[Any], bool]:
    """A check for :func:`compact_database`: the record's schedule compiles for ``target``.

    Records of a webgpu database are measured on CUDA; a few CUDA schedules do not lower to WGSL (the
    first webgpu run had one: a vectorised access WebGPU's code generator refuses), so a shipped webgpu
    database keeps only records that compile for webgpu.
    """

    def check(record: Any) -> bool:
        sch = s_tir.Schedule(record.workload.mod)
        try:
            record.trace.apply_to_schedule(sch, remove_postproc=False)
            tvm.tirx.build(sch.mod, target=target)
        except Exception as err:
            log.info("dropping a record that does not compile for %s: %s", target.kind.name, str(err)[:200])
            return False
        return True

    return check


def compact_database(src: Path, dst: Path, top_k: int = 2, keep: Callable[[Any], bool] | None = None) -> int:
    """Copy the ``top_k`` fastest valid records of every workload of ``src`` into a new database ``dst``.

    A tuning run keeps every measured candidate, failed ones included (megabytes for SD); a shipped
    database needs only the best. ``keep`` filters records first (for example :func:`compiles_for`).
    ``dst`` is written in a temporary directory and renamed into place. Returns the number of records kept.
    """
    source = mp.load_database(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    tmp.chmod(0o755)
    try:
        target = open_database(tmp)
        kept = 0
        seen: set[int] = set()
        for any_record in source.get_all_tuning_records():
            workload = any_record.workload
            key = int(tvm_ffi.structural_hash(workload.mod))
            if key in seen:
                continue
            seen.add(key)
            traces: set[str] = set()
            for record in source.get_top_k(workload, 1 << 16):  # fastest first, valid runs only
                if len(traces) == top_k:
                    break
                if str(record.trace) in traces or (keep is not None and not keep(record)):
                    continue
                traces.add(str(record.trace))
                target.commit_tuning_record(
                    ms.database.TuningRecord(
                        record.trace,
                        target.commit_workload(workload.mod),
                        record.run_secs,
                        record.target,
                        record.args_info,
                    )
                )
                kept += 1
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
        return kept
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":  # python -m mlcweb.databases SRC DST [TOP_K]
    logging.basicConfig(level=logging.INFO)
    dst = Path(sys.argv[2])
    check = None
    if dst.name == "webgpu":
        from .targets import resolve_target

        check = compiles_for(resolve_target("webgpu", link=False).tvm_target())
    n = compact_database(Path(sys.argv[1]), dst, int(sys.argv[3]) if len(sys.argv) > 3 else 2, keep=check)
    print(f"kept {n} records in {dst}")

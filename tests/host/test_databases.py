from pathlib import Path

from mlcweb.databases import DATABASES_DIR, compact_database, compiles_for
from mlcweb.targets import resolve_target


def test_webgpu_records_are_kept_only_if_they_compile_for_webgpu(tmp_path: Path) -> None:
    shipped = DATABASES_DIR / "webgpu"
    shipped_records = (shipped / "database_tuning_record.json").read_text().splitlines()
    webgpu = resolve_target("webgpu", link=False).tvm_target()
    assert compact_database(shipped, tmp_path / "all", keep=compiles_for(webgpu)) == len(shipped_records)
    assert compact_database(shipped, tmp_path / "none", keep=lambda _record: False) == 0
    assert (tmp_path / "none" / "database_workload.json").is_file()

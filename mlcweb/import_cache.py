"""A cache of imported models, so building a second target does not re-trace the model.

Keyed by the model name, the plugin's source files, its configuration, the model folder (paths, sizes
and modification times of its files) and the versions of the packages that shape the import. Entries
are written to a temporary directory and renamed into place, so an interrupted write is never read back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import tvm

from .manifest import versions
from .model import ImportedModel, ImportOptions
from .temp_dirs import make_temp_dir, remove_stale
from .tensor_cache import read_tensor_cache, write_tensor_cache

__all__ = ["ImportCache", "cache_key", "default_cache_dir"]

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    env = os.environ.get("MLCWEB_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlcweb"


def _folder_fingerprint(path: Path | None) -> list[tuple[str, int, int]]:
    if path is None:
        return []
    return sorted(
        (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()
    )


def config_files(config: dict[str, Any], keys: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """Size and modification time of the files that the config values under ``keys`` name (a string or
    a list of strings, each a path with an optional ``:suffix`` such as a LoRA's scale), so a changed
    file is a new import, as a changed model folder is."""
    found = []
    for key in keys:
        values = config.get(key)
        for value in values if isinstance(values, list) else [values]:
            if not isinstance(value, str):
                continue
            for candidate in (value, value.rpartition(":")[0]):
                path = Path(candidate).expanduser()
                if candidate and path.is_file():
                    found.append((str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns))
                    break
    return sorted(found)


def cache_key(
    model: str,
    config: dict[str, Any],
    options: ImportOptions,
    plugin_digest: str = "",
    file_keys: tuple[str, ...] = (),
) -> str:
    blob = json.dumps(
        {
            "model": model,
            "plugin_sources": plugin_digest,
            "config": config,
            "config_files": config_files(config, file_keys),
            "dtype": options.dtype,
            "model_path": str(options.model_path.resolve()) if options.model_path else None,
            "files": _folder_fingerprint(options.model_path),
            "versions": versions(),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class ImportCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_cache_dir()) / "imports"

    def entries(self) -> list[tuple[str, int, float]]:
        """``(key, bytes, last used)`` of every complete entry, most recently used first."""
        found = []
        for entry in self.root.glob("*"):
            if entry.is_dir() and (entry / "done").is_file():
                size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
                found.append((entry.name, size, (entry / "done").stat().st_mtime))
        return sorted(found, key=lambda e: -e[2])

    def clear(self, keep: int = 0) -> int:
        """Remove all but the ``keep`` most recently used entries, and every unfinished one (a killed
        write's temporary folder); returns the bytes freed."""
        freed = 0
        keep_keys = {key for key, _, _ in self.entries()[:keep]}
        for entry in self.root.glob("*") if self.root.is_dir() else []:
            if entry.name in keep_keys:
                continue
            freed += sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            shutil.rmtree(entry, ignore_errors=True)
        return freed

    def load(self, key: str, *, params: bool = True) -> ImportedModel | None:
        """The entry ``key``, or None where there is none (or it is damaged); without ``params`` its graph
        alone (no weights read: every function's parameters empty)."""
        entry = self.root / key
        if not (entry / "done").is_file():
            return None
        (entry / "done").touch()  # last used, for `mlcweb cache clear --keep N`
        try:
            mod = tvm.ir.load_json((entry / "mod.json").read_text())
            layout = json.loads((entry / "layout.json").read_text())
            tensors = read_tensor_cache(entry / "params")[0] if params else {}
            weights = {
                func: OrderedDict((name, tensors[f"{func}/{name}"]) for name in names) if params else OrderedDict()
                for func, names in layout["params"].items()
            }
        except Exception as err:  # a damaged entry is rebuilt, never trusted
            log.warning("ignoring damaged import cache entry %s: %s", entry, err)
            return None
        ranges = {
            func: {name: (int(r[0]), int(r[1])) for name, r in inputs.items()}
            for func, inputs in layout.get("input_ranges", {}).items()
        }
        return ImportedModel(mod=mod, params=weights, metadata=layout["metadata"], input_ranges=ranges)

    def store(self, key: str, imported: ImportedModel) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale(self.root, f".{key}-")
        tmp = make_temp_dir(self.root, f".{key}-")
        try:
            (tmp / "mod.json").write_text(tvm.ir.save_json(imported.mod))
            flat = {f"{func}/{name}": t for func, ps in imported.params.items() for name, t in ps.items()}
            write_tensor_cache(flat, tmp / "params")
            layout = {
                "params": {f: list(ps) for f, ps in imported.params.items()},
                "metadata": imported.metadata,
                "input_ranges": {f: {n: list(r) for n, r in ins.items()} for f, ins in imported.input_ranges.items()},
            }
            (tmp / "layout.json").write_text(json.dumps(layout, sort_keys=True))
            (tmp / "done").write_text("")
            final = self.root / key
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

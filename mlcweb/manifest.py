"""``manifest.json``: every artifact file with its size and sha256, plus what was built and with what.

It holds no timestamps or absolute paths, so two builds from the same inputs produce byte-identical
manifests; runtimes verify files against it before loading.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

from .errors import CorruptArtifactError

__all__ = [
    "MANIFEST",
    "file_entry",
    "inside",
    "is_mlcweb_build",
    "read_manifest",
    "sha256_file",
    "verify_files",
    "versions",
    "write_manifest",
]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_PACKAGES = ("mlcweb", "apache-tvm", "apache-tvm-ffi", "torch", "diffusers", "transformers", "numpy")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(root: Path, rel: str) -> dict[str, Any]:
    path = root / rel
    return {"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def write_manifest(root: Path, files: list[str], info: dict[str, Any]) -> None:
    entries = [file_entry(root, rel) for rel in sorted(set(files))]
    manifest = {"format": FORMAT_VERSION, **info, "versions": versions(), "files": entries}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def inside(root: Path, rel: object, what: str = "a manifest entry") -> Path:
    """``root / rel`` for a relative path that stays inside ``root`` (symbolic links resolved); raises
    :class:`CorruptArtifactError` for an absolute path, ``..`` or a link out of the folder."""
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or "\\" in rel:
        raise CorruptArtifactError(f"{what} names {rel!r}, which is not a relative path inside the artifact folder")
    parts = Path(rel).parts
    if ".." in parts or Path(rel).is_absolute():
        raise CorruptArtifactError(f"{what} names {rel!r}, which leaves the artifact folder; rebuild the artifacts")
    path = root / rel
    base = root.resolve()
    if path.exists() and base not in path.resolve().parents and path.resolve() != base:
        raise CorruptArtifactError(f"{what} {rel!r} is a link out of the artifact folder; rebuild the artifacts")
    return path


def _check_entries(path: Path, data: object) -> dict[str, Any]:
    """The manifest's structure: an object whose ``files`` are ``{path, size, sha256}`` entries."""
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise CorruptArtifactError(f"{path} is not an mlcweb manifest (no list of files); rebuild the artifacts")
    for entry in data["files"]:
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
            and len(entry["sha256"]) == 64
        )
        if not ok:
            raise CorruptArtifactError(f"{path} has a malformed file entry {entry!r:.80}; rebuild the artifacts")
    return data


def is_mlcweb_build(root: Path) -> bool:
    """Whether ``root`` holds an mlcweb build: a manifest.json that mlcweb wrote (format, files, versions)."""
    try:
        data = json.loads((root / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (
        isinstance(data, dict)
        and isinstance(data.get("format"), int)
        and isinstance(data.get("files"), list)
        and isinstance(data.get("versions"), dict)
        and "mlcweb" in data["versions"]
    )


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise CorruptArtifactError(
            f"{root} has no {MANIFEST}: it is not an mlcweb artifact directory (build one with `mlcweb build`)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptArtifactError(f"{path} is not valid JSON ({err}); rebuild the artifacts") from err
    return _check_entries(path, data)


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Check every listed file's size and sha256; raise :class:`CorruptArtifactError` naming the first bad one."""
    for entry in manifest["files"]:
        path = inside(root, entry["path"], "the manifest's file list")
        if not path.is_file():
            raise CorruptArtifactError(f"{path} is listed in the manifest but missing; rebuild the artifacts")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CorruptArtifactError(
                f"{path} has {size} bytes, the manifest records {entry['size']}: it is truncated or was "
                "replaced; rebuild or re-download the artifacts"
            )
        if sha256_file(path) != entry["sha256"]:
            raise CorruptArtifactError(
                f"{path} does not match its sha256 in the manifest: the file is corrupt; rebuild or "
                "re-download the artifacts"
            )

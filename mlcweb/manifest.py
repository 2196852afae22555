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


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise CorruptArtifactError(
            f"{root} has no {MANIFEST}: it is not an mlcweb artifact directory (build one with `mlcweb build`)"
        )
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CorruptArtifactError(f"{path} is not valid JSON ({err}); rebuild the artifacts") from err
    return data


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Check every listed file's size and sha256; raise :class:`CorruptArtifactError` naming the first bad one."""
    for entry in manifest["files"]:
        path = root / entry["path"]
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

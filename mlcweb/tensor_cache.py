"""The tensor cache: weights as ``tensor-cache.json`` plus ``params_shard_<i>.bin`` shards.

The layout is TVM's tvmjs one (``tvm.contrib.tvmjs.load_tensor_cache`` and the web runtime's
``fetchTensorCache`` read it): each shard record lists its tensors with name, shape, dtype, encoding,
byte offset and size. Shards hold about ``shard_mb`` MB so a browser can fetch and cache them one by
one. Encodings: ``raw`` (exact bytes: float32, float16, int...) and ``f32-to-bf16`` (float32 stored as
bfloat16, half the size, rounded to nearest even). Writing is deterministic (same tensors, same bytes)
and this reader checks every size, so a truncated or mismatched shard is an error, not garbage weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from .choices import ENCODINGS
from .errors import CorruptArtifactError
from .manifest import inside
from .packed_tensors import pack

__all__ = ["ENCODINGS", "INDEX_FILE", "read_tensor_cache", "write_tensor_cache"]

INDEX_FILE = "tensor-cache.json"


def _to_numpy(value: tvm.runtime.Tensor | np.ndarray) -> tuple[np.ndarray, str]:
    if isinstance(value, np.ndarray):
        return np.require(value, requirements="C"), str(value.dtype)
    return value.numpy(), str(value.dtype)


def _f32_to_bf16(value: np.ndarray) -> np.ndarray:
    bits = value.astype(np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    finite = np.isfinite(value)
    return (np.where(finite, bits + rounding, bits) >> 16).astype(np.uint16)


def _bf16_to_f32(value: np.ndarray) -> np.ndarray:
    return (value.astype(np.uint32) << 16).view(np.float32)


def write_tensor_cache(
    params: Mapping[str, tvm.runtime.Tensor | np.ndarray],
    out_dir: str | os.PathLike[str],
    *,
    encoding: str = "raw",
    shard_mb: int = 32,
    metadata: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write ``params`` (in order) as a tensor cache into ``out_dir``; return the files written."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown weight encoding {encoding!r}; choose one of {ENCODINGS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cap = shard_mb * (1 << 20)
    shards: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    data = bytearray()
    files: list[str] = []

    def flush() -> None:
        nonlocal data, pending
        if not pending:
            return
        name = f"params_shard_{len(shards)}.bin"
        (out / name).write_bytes(bytes(data))
        files.append(name)
        shards.append(
            {
                "dataPath": name,
                "format": "raw-shard",
                "nbytes": len(data),
                "records": pending,
                "md5sum": hashlib.md5(data, usedforsecurity=False).hexdigest(),
            }
        )
        data, pending = bytearray(), []

    for name, value in params.items():
        array, dtype = _to_numpy(value)
        fmt = encoding if dtype == "float32" else "raw"
        payload = (_f32_to_bf16(array) if fmt == "f32-to-bf16" else array).tobytes()
        if data and len(data) + len(payload) > cap:
            flush()
        pending.append(
            {
                "name": name,
                "shape": [int(d) for d in array.shape],
                "dtype": dtype,
                "format": fmt,
                "nbytes": len(payload),
                "byteOffset": len(data),
            }
        )
        data += payload
    flush()
    index = {"metadata": dict(metadata or {}), "records": shards}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [INDEX_FILE, *files]


def _record_array(raw: bytes, rec: dict[str, Any], path: Path) -> np.ndarray:
    """One tensor of a shard, checked: a known dtype, a shape of whole non-negative sizes, and a byte range
    inside the shard that holds exactly that many elements."""
    name = rec.get("name")
    try:
        shape = [int(d) for d in rec["shape"]]
        dtype = np.dtype("uint16" if rec["format"] == "f32-to-bf16" else rec["dtype"])
        start, nbytes = int(rec["byteOffset"]), int(rec["nbytes"])
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptArtifactError(f"tensor {name!r} in {path} has a malformed record ({err}); rebuild") from err
    count = int(np.prod(shape, dtype=np.int64))
    if dtype.kind not in "fiub" or any(d < 0 for d in shape) or start < 0 or start + nbytes > len(raw):
        raise CorruptArtifactError(f"tensor {name!r} in {path} lies outside its shard or has a bad shape; rebuild")
    if count * dtype.itemsize != nbytes:
        raise CorruptArtifactError(
            f"tensor {name!r} in {path} records {nbytes} bytes for shape {shape} of {rec['dtype']}; rebuild"
        )
    array = np.frombuffer(memoryview(raw)[start : start + nbytes], dtype=dtype)  # a view, no copy
    if rec["format"] == "f32-to-bf16":
        array = _bf16_to_f32(array)
    return array.reshape(shape)


def read_tensor_cache(
    cache_dir: str | os.PathLike[str], device: tvm.runtime.Device | None = None
) -> tuple[OrderedDict[str, tvm.runtime.Tensor], dict[str, Any]]:
    """Read a tensor cache onto ``device`` (all tensors in one allocation, :func:`~mlcweb.packed_tensors.pack`);
    raises :class:`CorruptArtifactError` on missing or truncated data."""
    root = Path(cache_dir)
    dev = device if device is not None else tvm.cpu()
    index_path = root / INDEX_FILE
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CorruptArtifactError(f"{index_path} is missing: this is not a complete artifact directory") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptArtifactError(f"{index_path} is not valid JSON ({err}); rebuild the artifacts") from err
    if not isinstance(index, dict) or not isinstance(index.get("records"), list):
        raise CorruptArtifactError(f"{index_path} is not a tensor cache index (no records); rebuild the artifacts")
    arrays: OrderedDict[str, np.ndarray] = OrderedDict()
    for shard in index["records"]:
        path = inside(root, shard.get("dataPath"), f"{INDEX_FILE}'s shard")
        if not path.is_file():
            raise CorruptArtifactError(f"weight shard {path} is missing; rebuild or re-download the artifacts")
        raw = path.read_bytes()
        if len(raw) != shard["nbytes"]:
            raise CorruptArtifactError(
                f"weight shard {path} has {len(raw)} bytes but the index records {shard['nbytes']}: "
                "the file is truncated or was replaced; rebuild or re-download the artifacts"
            )
        for rec in shard["records"]:
            arrays[rec["name"]] = _record_array(raw, rec, path)
    # one allocation for all: allocated one by one, large tensors round up to 2 MiB on CUDA
    return pack(arrays, dev), dict(index.get("metadata", {}))

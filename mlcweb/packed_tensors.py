"""Many small device tensors in one allocation.

Allocated one by one, a model's weights waste GPU memory: ``cudaMalloc`` hands out large blocks in
2 MiB steps, so SD1.5's 1,022 weight tensors (1,968 MiB) took 2,338 MiB on the H100. :func:`pack` puts
them in one allocation instead, each at a 256-byte aligned offset, and copies them over in one transfer.

TVM's own views (``Tensor._create_view``) keep the offset in ``byte_offset``, which compiled kernels
refuse (they require ``byte_offset == 0``); so each tensor is handed to TVM through DLPack with its data
pointer already offset, as the Relax VM's planned tensors are. The DLPack deleter keeps the allocation
alive until the last tensor in it is freed.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import tvm

__all__ = ["ALIGNMENT", "pack"]

ALIGNMENT = 256  # bytes: what cudaMalloc guarantees, and more than any vector load needs


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _Device),
        ("ndim", ctypes.c_int),
        ("dtype", _DataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _Managed(ctypes.Structure):
    pass


_Deleter = ctypes.CFUNCTYPE(None, ctypes.POINTER(_Managed))
_Managed._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _Deleter)]

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


@_Deleter
def _release(managed: Any) -> None:
    """DLPack deleter: drop the reference that kept this tensor's :class:`_Slice` (and arena) alive."""
    holder = ctypes.cast(managed.contents.manager_ctx, ctypes.py_object)
    ctypes.pythonapi.Py_DecRef(holder)


class _Slice:
    """A DLPack producer for ``shape``/``dtype`` at ``offset`` bytes into ``arena``."""

    def __init__(self, arena: tvm.runtime.Tensor, offset: int, shape: tuple[int, ...], dtype: str) -> None:
        self.arena = arena  # keeps the allocation alive as long as the slice
        self.shape = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        kind = tvm.runtime.DataType(dtype)
        self.managed = _Managed()
        t = self.managed.dl_tensor
        t.data = arena.data_ptr() + offset
        t.device = _Device(arena.device.dlpack_device_type(), arena.device.index)
        t.ndim = len(shape)
        t.dtype = _DataType(kind.type_code, kind.bits, kind.lanes)
        t.shape = self.shape
        t.strides = None
        t.byte_offset = 0
        self.managed.manager_ctx = id(self)
        self.managed.deleter = _release

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.managed.dl_tensor.device.device_type, self.managed.dl_tensor.device.device_id

    def __dlpack__(self, **_kwargs: Any) -> Any:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(self))  # released by _release when TVM frees it
        return _capsule_new(ctypes.addressof(self.managed), b"dltensor", None)


def _aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def pack(arrays: Mapping[str, np.ndarray], device: tvm.runtime.Device) -> OrderedDict[str, tvm.runtime.Tensor]:
    """``arrays`` as tensors on ``device``, all in one allocation (one host-to-device copy)."""
    offsets, total = [], 0
    for array in arrays.values():
        offsets.append(total)
        total += _aligned(max(array.nbytes, 1))
    host = np.zeros(max(total, 1), np.uint8)
    for offset, array in zip(offsets, arrays.values(), strict=True):
        host[offset : offset + array.nbytes] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    arena = tvm.runtime.empty(host.shape, "uint8", device)
    arena.copyfrom(host)
    out: OrderedDict[str, tvm.runtime.Tensor] = OrderedDict()
    for offset, (name, array) in zip(offsets, arrays.items(), strict=True):
        out[name] = tvm.runtime.from_dlpack(_Slice(arena, offset, tuple(array.shape), str(array.dtype)))
    return out

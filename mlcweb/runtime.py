"""Load an artifact directory natively and call its functions from Python."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from .cuda_limits import DEFAULT_CUDA_STACK_BYTES, set_cuda_stack_limit
from .errors import CorruptArtifactError, MlcwebError
from .manifest import inside, read_manifest, verify_files
from .tensor_cache import read_tensor_cache

__all__ = ["Artifacts", "KernelTime", "load"]


@dataclass(frozen=True)
class KernelTime:
    """Wall time of one kernel (or VM builtin) over all its calls in one function call."""

    name: str
    calls: int
    seconds: float


class Artifacts:
    """A built model on a device: ``artifacts("main", x)`` runs ``main`` with its weights appended."""

    def __init__(
        self,
        root: str | Path,
        device: str | None = None,
        *,
        verify: bool = True,
        cuda_stack_bytes: int | None = DEFAULT_CUDA_STACK_BYTES,
    ) -> None:
        """Load the artifacts in ``root`` onto ``device`` (the manifest's by default). On CUDA the
        context's per-thread stack limit is set to ``cuda_stack_bytes`` (None: the driver's 1 KiB) before
        any kernel runs: :mod:`mlcweb.cuda_limits` says why."""
        self.root = Path(root)
        if not self.root.is_dir():
            raise MlcwebError(f"artifact directory {self.root} does not exist; build it with `mlcweb build`")
        self.manifest: dict[str, Any] = read_manifest(self.root)
        if verify:
            verify_files(self.root, self.manifest)
        if self.manifest["target"] == "webgpu":
            raise MlcwebError(
                f"{self.root} was built for webgpu and runs in a browser: serve it with `mlcweb serve {self.root}`"
            )
        try:
            self.device = tvm.device(device or self.manifest["device"])
        except (ValueError, TypeError, RuntimeError) as err:
            raise MlcwebError(f"unknown device {device!r}; pass cpu, cuda, cuda:1, ...") from err
        if not self.device.exist:
            raise MlcwebError(f"device {self.device} is not available on this machine")
        lib = tvm.runtime.load_module(str(_library(self.root, self.manifest)))
        self.vm = relax.VirtualMachine(lib, self.device)
        tensors, _ = read_tensor_cache(self.root, self.device)
        if self.device.dlpack_device_type() == tvm.cuda().dlpack_device_type() and cuda_stack_bytes is not None:
            set_cuda_stack_limit(cuda_stack_bytes)  # the context exists (weights are on it); no launch yet
        self.params: dict[str, list[tvm.runtime.Tensor]] = {}
        for func, info in self.manifest["functions"].items():
            missing = [n for n in info["params"] if n not in tensors]
            if missing:
                raise CorruptArtifactError(f"weights {missing[:3]} of {func!r} are not in the tensor cache")
            self.params[func] = [tensors[n] for n in info["params"]]

    @property
    def functions(self) -> list[str]:
        return list(self.manifest["functions"])

    def input_specs(self, func: str = "main") -> list[dict[str, Any]]:
        return list(self.manifest["functions"][func]["inputs"])

    def __call__(self, func: str, *inputs: np.ndarray | tvm.runtime.Tensor) -> Any:
        if func not in self.params:
            raise MlcwebError(f"no function {func!r} in {self.root}; it has {', '.join(self.functions)}")
        specs = self.input_specs(func)
        if len(inputs) != len(specs):
            raise MlcwebError(f"{func!r} takes {len(specs)} inputs ({[s['name'] for s in specs]}), got {len(inputs)}")
        args = [self._tensor(x, s) for x, s in zip(inputs, specs, strict=True)]
        return self.vm[func](*args, *self.params[func])

    def profile(self, func: str, *inputs: np.ndarray | tvm.runtime.Tensor) -> list[KernelTime]:
        """Run ``func`` once, timing every call the VM makes (kernels and builtins), slowest first.

        The device is synchronised around each call, so each time is the kernel's own; the sum is more
        than a normal call takes (launches no longer overlap).
        """
        totals: dict[str, list[float]] = {}
        started: list[float] = []

        def instrument(_func: Any, symbol: str, before: bool, _ret: Any, *_args: Any) -> int:
            self.device.sync()
            if before:
                started.append(time.perf_counter())
            else:
                entry = totals.setdefault(str(symbol), [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - started.pop()
            return 0

        self(func, *inputs)  # warm-up: first calls load kernels
        self.device.sync()
        self.vm.set_instrument(instrument)
        try:
            self(func, *inputs)
        finally:
            self.vm.set_instrument(None)
        ranked = [KernelTime(name, int(n), sec) for name, (n, sec) in totals.items()]
        return sorted(ranked, key=lambda k: -k.seconds)

    def _tensor(self, value: np.ndarray | tvm.runtime.Tensor, spec: dict[str, Any]) -> tvm.runtime.Tensor:
        if isinstance(value, tvm.runtime.Tensor):
            return value
        array = np.asarray(value)
        if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
            raise MlcwebError(
                f"input {spec['name']!r} must be {spec['dtype']}{spec['shape']}, got {array.dtype}{list(array.shape)}"
            )
        check_range(array, spec)
        return tvm.runtime.tensor(np.require(array, requirements="C"), self.device)


def check_range(array: np.ndarray, spec: dict[str, Any]) -> None:
    """An integer input's values against the range its plugin declared (``spec["range"]``, inclusive)."""
    if "range" not in spec or array.size == 0:
        return
    low, high = spec["range"]
    lo, hi = int(array.min()), int(array.max())
    if lo < low or hi > high:
        bad = lo if lo < low else hi
        raise MlcwebError(f"input {spec['name']!r} holds {bad}, outside its range {low}..{high}; pass values in range")


def _library(root: Path, manifest: dict[str, Any]) -> Path:
    """The compiled library: loading it runs its code, so it must be one of the manifest's hashed files
    and inside the folder."""
    name = manifest.get("library")
    if name not in {entry["path"] for entry in manifest["files"]}:
        raise CorruptArtifactError(
            f"manifest.json names the library {name!r}, which is not one of its hashed files; rebuild the artifacts"
        )
    return inside(root, name, "the manifest's library")


def load(
    root: str | Path,
    device: str | None = None,
    *,
    verify: bool = True,
    cuda_stack_bytes: int | None = DEFAULT_CUDA_STACK_BYTES,
) -> Artifacts:
    return Artifacts(root, device, verify=verify, cuda_stack_bytes=cuda_stack_bytes)


def outputs_to_numpy(result: Any) -> OrderedDict[str, np.ndarray]:
    """A VM result (tensor or nested tuple) as ``{"output0": array, ...}``."""
    flat: list[np.ndarray] = []

    def walk(x: Any) -> None:
        if isinstance(x, tvm.runtime.Tensor):
            flat.append(x.numpy())
        elif isinstance(x, Sequence) or hasattr(x, "__len__"):
            for item in x:
                walk(item)

    walk(result)
    return OrderedDict((f"output{i}", a) for i, a in enumerate(flat))

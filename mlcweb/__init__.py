"""mlcweb: compile PyTorch / diffusers models with Apache TVM Relax for WebGPU and native GPUs.

Plugins import :data:`hookimpl` and the data classes from here::

    from mlcweb import ImportedModel, ModelSpec, hookimpl
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import MlcwebError

if TYPE_CHECKING:
    from .model import BuildOptions, ImportedModel, ImportOptions, ModelSpec
    from .plugins import hookimpl

__version__ = "0.1.0"

__all__ = ["BuildOptions", "ImportOptions", "ImportedModel", "MlcwebError", "ModelSpec", "hookimpl"]

# Imported on first use, so `mlcweb serve` and `mlcweb --help` do not load TVM.
_LAZY = {"BuildOptions": "model", "ImportOptions": "model", "ImportedModel": "model", "ModelSpec": "model"}
_LAZY["hookimpl"] = "plugins"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mlcweb' has no attribute {name!r}")

"""mlcweb: compile PyTorch / diffusers models with Apache TVM Relax for WebGPU and native GPUs.

Plugins import :data:`hookimpl` and the data classes from here::

    from mlcweb import ImportedModel, ModelSpec, hookimpl
"""

from .errors import MlcwebError
from .model import BuildOptions, ImportedModel, ImportOptions, ModelSpec
from .plugins import hookimpl

__version__ = "0.1.0"

__all__ = ["BuildOptions", "ImportOptions", "ImportedModel", "MlcwebError", "ModelSpec", "hookimpl"]

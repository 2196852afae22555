"""Where the mlcweb source tree keeps what is not Python: the ``web/`` folder."""

from __future__ import annotations

from pathlib import Path

from .errors import TargetUnavailableError

__all__ = ["web_dir"]


def web_dir() -> Path:
    """The ``web/`` folder of the mlcweb source tree (page sources, JS packages, runtime headers)."""
    path = Path(__file__).resolve().parents[1] / "web"
    if not (path / "lib").is_dir():
        raise TargetUnavailableError(
            f"the mlcweb web sources are not at {path}; building for webgpu needs a source checkout of "
            "mlcweb installed with `pip install -e .` (as `make demo` does)"
        )
    return path

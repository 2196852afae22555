from pathlib import Path

import pytest
from mlcweb_stable_diffusion.models import Networks, load_networks

from mlcweb import BuildOptions
from mlcweb.build import build
from mlcweb.plugins import PluginHost


@pytest.fixture(scope="session")
def nets() -> Networks:
    return load_networks("tiny", None, 0)


def _build(tmp_path_factory: pytest.TempPathFactory, dtype: str) -> Path:
    import mlcweb_stable_diffusion.plugin as plugin

    out = tmp_path_factory.mktemp("sd") / f"llvm-{dtype}"
    host = PluginHost([("stable_diffusion", plugin)], entry_points=False)
    options = BuildOptions(target="llvm", out=out, dtype=dtype, use_cache=False)
    build(host, "stable-diffusion", options, progress=False)
    return out


@pytest.fixture(scope="session")
def sd_llvm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model built for llvm in float32 (about 40 s on 2 cores)."""
    return _build(tmp_path_factory, "float32")


@pytest.fixture(scope="session")
def sd_llvm_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "float16")

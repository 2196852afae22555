"""Fixtures shared by several test folders: the tiny Stable Diffusion model built for each target."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlcweb import BuildOptions
from mlcweb.build import build
from mlcweb.plugins import PluginHost


def build_tiny_sd(
    out: Path, target: str, dtype: str, conv_layout: str = "auto", config: dict[str, object] | None = None
) -> Path:
    import mlcweb_stable_diffusion.plugin as plugin

    host = PluginHost([("stable_diffusion", plugin)], entry_points=False)
    options = BuildOptions(
        target=target, out=out, dtype=dtype, use_cache=False, conv_layout=conv_layout, config=config or {}
    )
    build(host, "stable-diffusion", options, progress=False)
    return out


@pytest.fixture(scope="session")
def sd_llvm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model built for llvm in float32 (about 40 s on 2 cores)."""
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "llvm-float32", "llvm", "float32")


@pytest.fixture(scope="session")
def sd_llvm_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model built for llvm in float16 with NHWC convolutions: the layout cuda builds use, here
    checked against diffusers on a machine without a GPU (the float32 and webgpu builds keep NCHW)."""
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "llvm-float16", "llvm", "float16", conv_layout="NHWC")


@pytest.fixture(scope="session")
def sd_webgpu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model built for webgpu in float16, with its float32 variant (a few minutes on 2 cores;
    the first webgpu build on a machine also compiles TVM's web runtime, about 2 minutes more)."""
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "webgpu-float16", "webgpu", "float16")


@pytest.fixture(scope="session", autouse=True)
def no_workers_left_behind() -> object:
    """Whatever the suite starts ends with it: MetaSchedule's popen workers (of tuning tests, and of
    tests that build candidates directly) are stopped when the session ends."""
    yield
    from mlcweb.tune import stop_popen_workers

    stop_popen_workers()

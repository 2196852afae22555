"""Fixtures shared by several test folders: the tiny Stable Diffusion model built for each target."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from testutil import build_tiny_sd

from mlcweb.wasm_runtime import LINK_OPT_ENV

# Every webgpu test links a wasm; emcc -O3 (what builds ship: binaryen shrinks the file) takes about a
# minute a link on 2 cores, -O1 about a second, for the same code. `make demo` links with -O3.
os.environ.setdefault(LINK_OPT_ENV, "-O1")


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

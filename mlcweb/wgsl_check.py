"""Check a webgpu build's WGSL shaders at build time, with the WebGPU implementation Chrome uses.

TVM writes one WGSL shader per kernel, and nothing compiles them until a page creates its pipelines: a
shader WGSL rejects (an 8-bit integer type, an extension the kernel forgot) is a ``GPUPipelineError`` in
the user's browser. :func:`check_wgsl` hands every shader of a compiled module to Dawn (npm ``webgpu``,
the library behind Chrome's WebGPU) in node, on whatever Vulkan device the machine has, SwiftShader on
the CPU included (Debian's chromium ships its driver), and turns the first rejection into a build error
naming the kernel. Without node, the npm package or a Vulkan driver the check is skipped with a warning
(``MLCWEB_WGSL_CHECK=require`` makes that an error, ``=off`` skips it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MlcwebError
from .source_tree import web_dir

__all__ = ["WGSLCheckError", "WorkgroupNeeds", "check_matrix_wgsl", "check_wgsl", "wgsl_sources", "workgroup_needs"]

log = logging.getLogger(__name__)

SWIFTSHADER = Path("/usr/lib/chromium/vk_swiftshader_icd.json")
_HEADER = re.compile(r"^// Function: (\S+)\n//-+\n", re.M)
_WORKGROUP_VAR = re.compile(r"^var<workgroup>\s+\w+\s*:\s*(.+?)\s*;", re.M)
_WORKGROUP_SIZE = re.compile(r"@workgroup_size\(\s*(\d+)u?\s*(?:,\s*(\d+)u?\s*)?(?:,\s*(\d+)u?\s*)?\)")
_SCALAR_BYTES = {"f16": 2, "f32": 4, "i32": 4, "u32": 4, "bool": 4}
_TYPE = re.compile(r"^(?:array<(.+),\s*(\d+)u?>|vec([234])<(\w+)>|(\w+))$")


@dataclass(frozen=True)
class WorkgroupNeeds:
    """What a build's kernels need of a WebGPU device beyond buffers: the most workgroup memory one
    kernel declares (WGSL's size rule: each variable rounded up to 16 bytes) and the most invocations
    of one workgroup."""

    storage_bytes: int
    invocations: int

    def manifest(self) -> dict[str, int]:
        return {"workgroup_storage_bytes": self.storage_bytes, "invocations_per_workgroup": self.invocations}


def _layout(wgsl_type: str) -> tuple[int, int]:
    """(size, alignment) in bytes of a WGSL workgroup variable's type: scalars, vectors (vec3 aligned as
    vec4) and (nested) arrays of them, whose stride is the element size rounded up to its alignment."""
    m = _TYPE.match(wgsl_type.strip())
    if m is None:
        raise ValueError(f"unknown WGSL workgroup type {wgsl_type!r}")
    element, count, lanes, lane_type, scalar = m.groups()
    if element is not None:
        size, align = _layout(element)
        return -(-size // align) * align * int(count), align
    if lanes is not None:
        scalar_bytes = _SCALAR_BYTES[lane_type]
        return int(lanes) * scalar_bytes, (4 if lanes == "3" else int(lanes)) * scalar_bytes
    return _SCALAR_BYTES[scalar], _SCALAR_BYTES[scalar]


def workgroup_needs(sources: dict[str, str]) -> WorkgroupNeeds:
    """The largest workgroup memory and workgroup size over ``sources`` (:func:`wgsl_sources`)."""
    storage, invocations = 0, 1
    for code in sources.values():
        total = sum(-(-_layout(t)[0] // 16) * 16 for t in _WORKGROUP_VAR.findall(code))
        storage = max(storage, total)
        for size in _WORKGROUP_SIZE.findall(code):
            count = 1
            for part in size:
                count *= int(part) if part else 1
            invocations = max(invocations, count)
    return WorkgroupNeeds(storage, invocations)


class WGSLCheckError(MlcwebError):
    """A kernel's WGSL does not compile."""


def wgsl_sources(module: Any) -> dict[str, str]:
    """Every kernel's WGSL in a compiled module (its webgpu device modules' sources, split by kernel)."""
    sources: dict[str, str] = {}
    stack = [module]
    while stack:
        mod = stack.pop()
        if mod.kind == "webgpu":
            parts = _HEADER.split(mod.inspect_source())
            for name, body in zip(parts[1::2], parts[2::2], strict=True):
                if body.strip():
                    sources[name] = body
        stack.extend(mod.imports)
    return sources


def _environment() -> tuple[list[str], dict[str, str]] | str:
    """The node command prefix and environment, or why the check cannot run here."""
    node = shutil.which("node")
    dawn = web_dir() / "node_modules" / "webgpu"
    if node is None:
        return "node is not installed"
    if not (dawn / "index.js").is_file():
        return f"npm `webgpu` is not installed under {dawn.parent} (npm ci in web/)"
    env = dict(os.environ)
    if SWIFTSHADER.is_file() and "VK_ICD_FILENAMES" not in env and "VK_DRIVER_FILES" not in env:
        env["VK_ICD_FILENAMES"] = str(SWIFTSHADER)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(SWIFTSHADER.parent), env.get("LD_LIBRARY_PATH")]))
    return [node, str(web_dir() / "lib" / "check_wgsl.mjs"), str(dawn)], env


def check_wgsl(module: Any, float16: bool = True) -> int:
    """Compile every WGSL shader of ``module`` with Dawn; raises :class:`WGSLCheckError` naming the first
    kernel that fails, or, with ``float16=False`` (a float32 build, the one pages load on adapters without
    ``shader-f16``), the first kernel that uses f16 at all. Returns how many shaders were checked (0 when
    the check could not run)."""
    mode = os.environ.get("MLCWEB_WGSL_CHECK", "auto")
    if mode == "off":
        return 0
    sources = wgsl_sources(module)
    if not float16:
        uses_f16 = sorted(name for name, code in sources.items() if re.search(r"^\s*enable f16;", code, re.M))
        if uses_f16:
            raise WGSLCheckError(
                f"kernel {uses_f16[0]} of this float32 build uses float16 (WGSL `enable f16`)"
                + (f", as do {len(uses_f16) - 1} more" if len(uses_f16) > 1 else "")
                + ": a GPU without shader-f16 could not run it. A pass put float16 into a float32 build"
            )
    return _check(sources, mode)


def check_matrix_wgsl(sources: dict[str, str]) -> int:
    """Compile kernels written on ``chromium-experimental-subgroup-matrix`` ({shader name: WGSL}) with
    Dawn's null backend, which offers the feature no CPU driver does (Tint's whole validation, no code
    generation); raises :class:`WGSLCheckError` naming the first that fails. Returns how many were checked
    (0 when the check could not run, as for :func:`check_wgsl`)."""
    mode = os.environ.get("MLCWEB_WGSL_CHECK", "auto")
    return 0 if mode == "off" or not sources else _check(sources, mode, "matrix")


def _check(sources: dict[str, str], mode: str, *flags: str) -> int:
    setup = _environment()
    if isinstance(setup, str):
        if mode == "require":
            raise MlcwebError(f"cannot check the WGSL shaders: {setup}")
        log.warning("WGSL shaders not checked: %s", setup)
        return 0
    command, env = setup
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sources.json"
        path.write_text(json.dumps(sources))
        done = subprocess.run([*command, str(path), *flags], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["node failed"])[-1]
        if mode == "require":
            raise MlcwebError(f"cannot check the WGSL shaders: {why}")
        log.warning("WGSL shaders not checked: %s", why)
        return 0
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report["errors"]:
        name, message = sorted(report["errors"].items())[0]
        more = len(report["errors"]) - 1
        raise WGSLCheckError(
            f"the WGSL shader of kernel {name} does not compile on WebGPU (Dawn): {message}"
            + (f" ({more} more kernels fail)" if more else "")
            + "; a page would fail to create its pipeline. Change the operator or the pass that produced it"
        )
    log.info("%d WGSL shaders compile (Dawn%s)", report["checked"], "" if report["f16"] else ", f16 checked as f32")
    return int(report["checked"])

"""Build targets by name, with a clear error when the installed TVM cannot build one."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

import tvm

from .errors import TargetUnavailableError

__all__ = ["SUBGROUP_SIZES", "TARGETS", "TargetInfo", "resolve_target", "with_subgroups"]

# subgroup sizes a webgpu library can be built for: TVM's webgpu target lowers reductions for 32-wide
# subgroups only (supports_subgroups sets thread_warp_size to 32)
SUBGROUP_SIZES = (32,)


@dataclass(frozen=True)
class TargetInfo:
    """A named build target: TVM target JSON, host, runtime device and library suffix."""

    name: str
    kind: dict[str, Any]
    host: dict[str, Any] | None
    device: str
    library_suffix: str
    description: str

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target(self.kind, host=self.host) if self.host else tvm.target.Target(self.kind)


_LLVM_HOST = {"kind": "llvm"}
TARGETS: dict[str, TargetInfo] = {
    t.name: t
    for t in [
        TargetInfo("llvm", {"kind": "llvm"}, None, "cpu", ".so", "CPU through LLVM"),
        TargetInfo("cuda", {"kind": "cuda", "arch": "sm_90"}, _LLVM_HOST, "cuda", ".so", "NVIDIA GPU (sm_90)"),
        TargetInfo("vulkan", {"kind": "vulkan"}, _LLVM_HOST, "vulkan", ".so", "Vulkan GPU (SPIR-V)"),
        TargetInfo("metal", {"kind": "metal"}, _LLVM_HOST, "metal", ".dylib", "Apple GPU (Metal)"),
        TargetInfo(
            "webgpu",
            {"kind": "webgpu"},
            {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"},
            "webgpu",
            ".wasm",
            "browser WebGPU, host code in wasm32",
        ),
    ]
}

_CODEGEN = {
    "llvm": "target.build.llvm",
    "cuda": "target.build.cuda",
    "vulkan": "target.build.vulkan",
    "metal": "target.build.metal",
    "webgpu": "target.build.webgpu",
}


def with_subgroups(info: TargetInfo, size: int) -> TargetInfo:
    """The webgpu target whose cross-thread reductions use WGSL subgroup operations (``enable subgroups``)
    for subgroups of ``size`` invocations: TVM lowers a reduction over threads to shuffles within each
    ``size``-wide group and one exchange through workgroup memory between groups, instead of a tree of
    workgroup-memory steps with a barrier each. Correct only where the adapter's subgroups are exactly
    ``size`` wide (the page checks ``subgroupMinSize`` and ``subgroupMaxSize``); TVM builds for 32 only
    (:data:`SUBGROUP_SIZES`), the width of NVIDIA's and Apple's subgroups."""
    if info.name != "webgpu":
        raise TargetUnavailableError(f"subgroup libraries are for the webgpu target, not {info.name!r}")
    if size not in SUBGROUP_SIZES:
        raise TargetUnavailableError(
            f"subgroup size {size} is not one TVM builds webgpu reductions for; choose "
            f"{' or '.join(map(str, SUBGROUP_SIZES))} (NVIDIA and Apple GPUs), or 0 for no subgroup library"
        )
    kind = {**info.kind, "supports_subgroups": True, "thread_warp_size": size}
    return TargetInfo(
        info.name, kind, info.host, info.device, info.library_suffix, f"{info.description}, subgroups of {size}"
    )


def resolve_target(name: str, *, arch: str | None = None, link: bool = True) -> TargetInfo:
    """The :class:`TargetInfo` for ``name``; raises :class:`TargetUnavailableError` with the fix.

    ``link=False`` skips the check for the tools that link a library (emcc for webgpu): tuning compiles
    kernels but links nothing.
    """
    if name not in TARGETS:
        raise TargetUnavailableError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}")
    info = TARGETS[name]
    if tvm.get_global_func(_CODEGEN[name], allow_missing=True) is None:
        raise TargetUnavailableError(
            f"the installed TVM ({tvm.__version__}) cannot build for {name!r}: it was compiled without "
            f"that backend (no {_CODEGEN[name]}). Build for one of "
            f"{', '.join(n for n in TARGETS if tvm.get_global_func(_CODEGEN[n], allow_missing=True))}, "
            f"or install a TVM built with the {name} backend enabled"
        )
    if name == "webgpu" and link:
        from .web import check_web_toolchain

        check_web_toolchain()
    if name == "cuda" and shutil.which("nvcc") is None:
        raise TargetUnavailableError("building for 'cuda' needs nvcc on PATH (the CUDA toolkit); install it")
    if arch is not None:
        if name != "cuda":
            raise TargetUnavailableError(f"--arch applies to the cuda target only, not {name!r}")
        info = TargetInfo(
            info.name,
            {**info.kind, "arch": arch},
            info.host,
            info.device,
            info.library_suffix,
            f"NVIDIA GPU ({arch})",
        )
    return info

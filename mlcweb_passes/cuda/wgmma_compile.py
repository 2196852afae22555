"""Compile generated CUDA kernels into a runtime module and launch them from host PrimFuncs.

:func:`compile_kernels` turns kernels' CUDA source into one cubin (``nvcc`` when it is on PATH, else
TVM's NVRTC route) wrapped as a TVM CUDA module; :func:`launcher` is the host PrimFunc that keeps a fused
PrimFunc's signature and launches the kernel instead; :func:`external_modules` lists what is attached
to an IRModule for ``tvm.compile`` to link.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm import tirx

from .._tir import HAND_WRITTEN, SCHEDULED_ATTR, SOURCE_ATTR
from .wgmma_source import THREADS, WgmmaKernel, module_source

__all__ = ["compile_kernels", "cuda_runtime", "external_modules", "launcher"]


def cuda_runtime() -> bool:
    """Whether this TVM can create CUDA modules (its CUDA runtime is built in)."""
    return tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None


def launcher(func: tirx.PrimFunc, kernel: WgmmaKernel) -> tirx.PrimFunc:
    """A host function with ``func``'s signature launching ``kernel``."""
    gx, gy, gz = kernel.grid()
    call = tirx.call_packed(
        kernel.name, *[p.data for p in func.params], gx, gy, gz, THREADS, kernel.tile.shared_bytes()
    )
    host = tirx.PrimFunc(list(func.params), tirx.Evaluate(call), func.ret_type, func.attrs)
    return host.with_attr(SCHEDULED_ATTR, True).with_attr(SOURCE_ATTR, HAND_WRITTEN)


def compile_kernels(kernels: list[WgmmaKernel], arch: str = "sm_90a") -> Any:
    """Compile ``kernels`` into one CUDA runtime module (a cubin, by nvcc when it is on PATH, else by TVM's
    NVRTC route), each kernel launched as TVM launches its own (grid, block, dynamic shared memory)."""
    binary = _cubin(module_source(kernels), arch)
    tags = ["blockIdx.x", "blockIdx.y", "blockIdx.z", "threadIdx.x", "tirx.use_dyn_shared_memory"]
    info = {k.name: {"name": "", "arg_types": ["handle"] * len(k.params), "launch_param_tags": tags} for k in kernels}
    metadata = json.dumps({"tvm_version": tvm.__version__, "func_info": info})
    fmap = tvm_ffi.get_global_func("runtime.LoadMetaDataFromJSON")(metadata)
    return tvm_ffi.get_global_func("ffi.Module.create.cuda")(binary, "cubin", fmap, {})


def _cubin(code: str, arch: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        source, cubin = Path(tmp) / "wgmma.cu", Path(tmp) / "wgmma.cubin"
        if shutil.which("nvcc"):
            source.write_text(code)
            number = arch.removeprefix("sm_")
            cmd = ["nvcc", "--cubin", "-O3", "-std=c++17", f"-gencode=arch=compute_{number},code={arch}"]
            cmd += ["-diag-suppress=177", "-o", str(cubin), str(source)]  # 177: unused index variables
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(f"nvcc failed on the wgmma kernels:\n{done.stderr[-4000:]}")
        else:
            from tvm.support import nvcc

            nvcc.compile_cuda(code, "cubin", arch, ["-std=c++17"], str(cubin), compiler="nvrtc")
        return cubin.read_bytes()


def external_modules(mod: tvm.IRModule) -> list[Any]:
    """The runtime modules attached to ``mod`` for ``tvm.compile`` to link (``external_mods``)."""
    return list(mod.attrs["external_mods"]) if mod.attrs and "external_mods" in mod.attrs else []

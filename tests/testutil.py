"""Helpers shared by the tests: import small torch models into Relax, compile and run them."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

import mlcweb_passes as mp
from mlcweb_passes.targets import GpuFacts


def import_torch(model: torch.nn.Module, args: Sequence[torch.Tensor]) -> tvm.IRModule:
    """torch.export + from_exported_program with the weights as trailing inputs."""
    exported = torch.export.export(model.eval(), tuple(args))
    return from_exported_program(exported, keep_params_as_input=True, unwrap_unit_return_tuple=True)


class DiffusersAttention(torch.nn.Module):
    """diffusers' Attention with AttnProcessor2_0: separate projections, SDPA, heads transposed back."""

    def __init__(self, dim: int = 32, context_dim: int = 24, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = torch.nn.Linear(dim, dim, bias=False)
        self.to_k = torch.nn.Linear(context_dim, dim, bias=False)
        self.to_v = torch.nn.Linear(context_dim, dim, bias=False)
        self.to_out = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.view(b, -1, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(o.transpose(1, 2).reshape(b, n, c))


def build(mod: tvm.IRModule, target: str = "llvm", **options: object) -> relax.VirtualMachine:
    """``mod`` compiled by the whole pipeline with ``PipelineOptions(**options)``, on the CPU."""
    tgt = tvm.target.Target(target)
    exe = tvm.compile(mod, tgt, relax_pipeline=mp.pipeline(tgt, mp.PipelineOptions(**options)))  # type: ignore[arg-type]
    return relax.VirtualMachine(exe, tvm.cpu())


def to_tvm(*arrays: np.ndarray | torch.Tensor) -> list[tvm.runtime.Tensor]:
    out = []
    for a in arrays:
        arr = a.detach().numpy() if isinstance(a, torch.Tensor) else a
        out.append(tvm.runtime.tensor(np.require(arr, requirements="C"), tvm.cpu()))
    return out


def as_numpy(result: object) -> list[np.ndarray]:
    """A VM result (tensor or tuple of tensors) as a list of numpy arrays."""
    if isinstance(result, tvm.runtime.Tensor):
        return [result.numpy()]
    return [r.numpy() for r in result]  # type: ignore[attr-defined]


def op_names(mod: tvm.IRModule, func: str = "main") -> list[str]:
    """Names of the Relax operators called in ``func``, in order."""
    names: list[str] = []

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            names.append(expr.op.name)

    relax.analysis.post_order_visit(mod[func].body, visit)
    return names


def kernel_launches(mod: tvm.IRModule, func: str = "main") -> list[relax.VarBinding]:
    """The bindings of ``func`` that launch a kernel (``call_tir``), in order."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    return [
        b
        for block in mod[func].body.blocks
        for b in block.bindings
        if isinstance(b.value, relax.Call) and b.value.op.same_as(call_tir)
    ]


def function_names(mod: tvm.IRModule) -> list[str]:
    return sorted(gv.name_hint for gv in mod.get_global_vars())


def composite_names(mod: tvm.IRModule) -> list[str]:
    """The ``Composite`` attribute of every composite function (pattern fusion) in ``mod``."""
    return [
        str(f.attrs["Composite"])
        for _, f in mod.functions_items()
        if isinstance(f, relax.Function) and f.attrs is not None and "Composite" in f.attrs
    ]


def nvcc_ptx(source: str, tmp_path: Path, arch: str = "sm_90") -> str:
    """Compile CUDA ``source`` to PTX with nvcc and return the PTX; skips the test without nvcc. TVM only
    prints CUDA on this machine (no GPU, no NVRTC), and its printer does not guarantee valid CUDA."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed; the GPU benchmarks compile the kernels instead")
    (tmp_path / "k.cu").write_text(source)
    done = subprocess.run(
        [nvcc, "--ptx", f"-arch={arch}", "-o", str(tmp_path / "k.ptx"), str(tmp_path / "k.cu")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return (tmp_path / "k.ptx").read_text()


# A GPU of an H100's size, for tests of rules that size their work by the GPU (kernels are planned for
# it wherever a test checks a choice; on a build machine without a GPU the targets' reference part).
H100 = GpuFacts(sm_count=132, max_threads=1024, max_shared_bytes=227 * 1024)


def build_tiny_sd(
    out: Path,
    target: str,
    dtype: str,
    conv_layout: str = "auto",
    config: dict[str, object] | None = None,
    webgpu_fallback: bool = True,
    webgpu_subgroup_size: int = 32,
) -> Path:
    import mlcweb_stable_diffusion.plugin as plugin

    from mlcweb import BuildOptions
    from mlcweb.build import build as build_model
    from mlcweb.plugins import PluginHost

    host = PluginHost([("stable_diffusion", plugin)], entry_points=False)
    options = BuildOptions(
        target=target,
        out=out,
        dtype=dtype,
        use_cache=False,
        conv_layout=conv_layout,
        config=config or {},
        webgpu_fallback=webgpu_fallback,
        webgpu_subgroup_size=webgpu_subgroup_size,
    )
    build_model(host, "stable-diffusion", options, progress=False)
    return out


def sd_pipeline(nets: Any, tokenizer: Any, scheduler: str, cls: Any = None, tokenizer_2: Any = None) -> Any:
    """diffusers' text-to-image pipeline over the tiny networks ``nets`` (StableDiffusionXLPipeline for
    SDXL's, else ``cls``, StableDiffusionPipeline by default), with the compiled build's scheduler
    ``scheduler`` as diffusers configures it."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from mlcweb_stable_diffusion.schedulers import SCHEDULERS

    parts = {
        "vae": nets.vae,
        "text_encoder": nets.clip,
        "tokenizer": tokenizer,
        "unet": nets.unet,
        "scheduler": SCHEDULERS[scheduler](nets.scheduler_config).diffusers(),
    }
    if nets.clip2 is not None:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=nets.clip2, tokenizer_2=tokenizer_2)
    else:
        pipe = (cls or StableDiffusionPipeline)(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe

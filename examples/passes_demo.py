"""Smoke demo: compile a small conv + attention block through the mlcweb_passes pipeline on the CPU.

Prints what each stage did (weights detached, work lifted, kernels fused, schedules, planned memory)
and checks the compiled output against PyTorch. Run with ``python examples/passes_demo.py``.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

import mlcweb_passes as mp


class DemoBlock(torch.nn.Module):
    """GroupNorm + SiLU + conv residual, then multi-head self-attention over the pixels."""

    def __init__(self, channels: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.GroupNorm(8, channels)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.qkv = torch.nn.Linear(channels, 3 * channels)
        self.proj = torch.nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.conv(torch.nn.functional.silu(self.norm(x)))
        b, c, hh, ww = h.shape
        t = h.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).view(b, hh * ww, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        t = t + self.proj(a.transpose(1, 2).reshape(b, hh * ww, c))
        return t.transpose(1, 2).reshape(b, c, hh, ww)


def main() -> int:
    torch.manual_seed(0)
    model = DemoBlock().eval()
    x = torch.randn(1, 32, 16, 16)
    target = tvm.target.Target("llvm")
    t0 = time.perf_counter()

    exported = torch.export.export(model, (x,))
    imported = from_exported_program(exported, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    mod, params = mp.detach_params(imported)
    first = ", ".join(list(params)[:3])
    print(f"import:   torch.export -> Relax, {len(params)} weights detached ({first}, ...)")

    lifted = mp.split_transform_params(mod)
    weights = mp.apply_transform_params(lifted.transform, params)
    print(f"lift:     {lifted.transform_functions()[0]} computed {len(weights)} deploy weights on the CPU")

    phases = mp.phases(target)
    with target:
        graph = phases["graph"](lifted.deploy)
        plain = mp.count_kernels(mp.FuseOperators()(graph))
        fused = phases["fuse"](graph)
        scheduled = phases["schedule"](phases["kernels"](fused))
        planned = phases["memory"](scheduled)
    print(f"fuse:     {plain} kernels with operator fusion, {mp.count_kernels(fused)} with softmax and cast fusion")
    print(f"schedule: {mp.schedule_report(scheduled).summary()}")
    mem = mp.memory_report(planned)["main"]
    kib, big = mem.planned_bytes / 1024, mem.largest_bytes / 1024
    print(f"memory:   {kib:.0f} KiB planned in {mem.storages} blocks, largest {big:.0f} KiB")

    exe = tvm.compile(lifted.deploy, target, relax_pipeline=mp.pipeline(target))
    vm = relax.VirtualMachine(exe, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()), *weights).numpy()
    expected = model(x).detach().numpy()
    err = float(np.abs(out - expected).max())
    total = time.perf_counter() - t0
    print(f"run:      max abs error vs PyTorch {err:.2e} (tolerance 1e-4), total {total:.1f} s")
    return 0 if err < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())

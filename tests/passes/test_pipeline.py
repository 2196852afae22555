import subprocess
import sys

import numpy as np
import torch
import tvm
from testutil import as_numpy, import_torch, to_tvm
from tvm import relax

import mlcweb_passes as mp


class Block(torch.nn.Module):
    """A residual conv block followed by self-attention: the shapes of a tiny UNet stage."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 8)
        self.qkv = torch.nn.Linear(8, 24)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.conv(torch.nn.functional.silu(self.norm(x)))
        b, c, hh, ww = h.shape
        t = h.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).view(b, hh * ww, 3, 2, 4).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        t = t + self.proj(a.transpose(1, 2).reshape(b, hh * ww, c))
        return t.transpose(1, 2).reshape(b, c, hh, ww)


def _model() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Block().eval(), torch.randn(1, 8, 8, 8)


def test_pipeline_via_tvm_compile_matches_pytorch() -> None:
    model, x = _model()
    mod, params = mp.detach_params(import_torch(model, [x]))
    lifted = mp.split_transform_params(mod)
    weights = mp.apply_transform_params(lifted.transform, params)
    target = tvm.target.Target("llvm")
    exe = tvm.compile(lifted.deploy, target, relax_pipeline=mp.pipeline(target))
    got = as_numpy(relax.VirtualMachine(exe, tvm.cpu())["main"](*to_tvm(x), *weights))[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_pipeline_via_relax_build_with_mixed_precision() -> None:
    model, x = _model()
    mod, params = mp.detach_params(import_torch(model, [x]))
    exe = relax.build(mod, "llvm", relax_pipeline=mp.pipeline("llvm", mixed_precision="float32"))
    got = as_numpy(relax.VirtualMachine(exe, tvm.cpu())["main"](*to_tvm(x), *params.values()))[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=0, atol=2e-2)


def test_lowering_passes_are_in_the_documented_order() -> None:
    options = mp.PipelineOptions(fuse_attention=True)
    names = [p.info.name for p in mp.lowering_passes(tvm.target.Target("llvm"), options=options)]
    order = [
        "mlcweb.DropSoftmaxGuard",
        "mlcweb.FuseAttention",
        "mlcweb.FuseSoftmax",
        "mlcweb.HoistNarrowingCasts",
        "mlcweb.FuseOperators",
        "mlcweb.ApplyDatabase",
        "mlcweb.LiftKernelScratch",
        "mlcweb.StaticMemoryPlan",
    ]
    assert [n for n in names if n in order] == order
    assert names[-1] == "AttachGlobalSymbol"
    default = [p.info.name for p in mp.lowering_passes(tvm.target.Target("llvm"))]
    assert "mlcweb.FuseAttention" not in default  # off until a schedule rule handles its fused kernel


def test_importing_the_library_does_not_import_mlcweb() -> None:
    code = (
        "import sys, mlcweb_passes; "
        "sys.exit(1 if any(m == 'mlcweb' or m.startswith('mlcweb.') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

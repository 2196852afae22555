import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from testutil import H100, as_numpy, import_torch, to_tvm
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


def test_pipeline_after_weight_lifting_matches_pytorch() -> None:
    """The weights phase before lifting, the rest through tvm.compile: the split ``mlcweb build`` makes."""
    model, x = _model()
    mod, params = mp.detach_params(import_torch(model, [x]))
    target = tvm.target.Target("llvm")
    with target:
        mod = mp.phases(target)["weights"](mod)
    lifted = mp.split_transform_params(mod)
    weights = mp.apply_transform_params(lifted.transform, params)
    exe = tvm.compile(lifted.deploy, target, relax_pipeline=mp.pipeline(target, after="weights"))
    got = as_numpy(relax.VirtualMachine(exe, tvm.cpu())["main"](*to_tvm(x), *weights))[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_whole_pipeline_via_relax_build_in_float16() -> None:
    model, x = _model()
    mod, params = mp.detach_params(import_torch(model, [x]))
    exe = relax.build(mod, "llvm", relax_pipeline=mp.pipeline("llvm", mp.PipelineOptions(dtype="float16")))
    got = as_numpy(relax.VirtualMachine(exe, tvm.cpu())["main"](*to_tvm(x), *params.values()))[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=0, atol=2e-2)


def _names(phase: tvm.transform.Sequential) -> list[str]:
    return [p.info.name for p in phase.passes]


def test_phases_in_order_each_pass_once() -> None:
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    phases = mp.phases(cuda, mp.PipelineOptions(dtype="float16", gpu=H100))
    assert list(phases) == list(mp.PHASES)
    assert _names(phases["weights"]) == [
        "mlcweb.FoldLinearReshapes",
        "mlcweb.MixedPrecision",
        "mlcweb.ConvLayout",
        "mlcweb.LinearWeightLayout",
        "mlcweb.SplitKConv",
    ]
    assert _names(phases["graph"])[0] == "mlcweb.DropSoftmaxGuard" and "mlcweb.FlashAttention" in _names(
        phases["graph"]
    )
    assert _names(phases["fuse"])[-1] == "mlcweb.FuseOperators"
    assert _names(phases["kernels"]) == ["mlcweb.WgmmaGemm"]
    assert _names(phases["schedule"]) == ["mlcweb.ApplyDatabase", "mlcweb.LiftKernelScratch"]
    assert _names(phases["memory"]) == ["mlcweb.StaticMemoryPlan"]
    assert _names(phases["finalize"])[-1] == "AttachGlobalSymbol"
    every = [name for phase in phases.values() for name in _names(phase)]
    assert len(every) == len(set(every))


def test_phases_follow_the_target_and_options() -> None:
    llvm = mp.phases("llvm")
    assert _names(llvm["weights"]) == ["mlcweb.FoldLinearReshapes"] and _names(llvm["kernels"]) == []
    webgpu = _names(mp.phases({"kind": "webgpu"})["graph"])
    # the portable flash kernel first, then chunks for the attention it does not take
    assert "mlcweb.Int32Tensors" in webgpu and webgpu[-2:] == ["mlcweb.FlashAttention", "mlcweb.ChunkAttentionRows"]
    no_flash = _names(mp.phases({"kind": "webgpu"}, mp.PipelineOptions(flash_attention=False))["graph"])
    assert "mlcweb.FlashAttention" not in no_flash
    assert "mlcweb.FlashAttention" not in _names(mp.phases("vulkan")["graph"])
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    off = mp.phases(cuda, mp.PipelineOptions(dtype="float16", split_k=False, wgmma=False, gpu=H100))
    assert "mlcweb.SplitKConv" not in _names(off["weights"]) and _names(off["kernels"]) == []
    nchw = mp.phases(cuda, mp.PipelineOptions(dtype="float16", conv_layout="NCHW", gpu=H100))
    assert _names(nchw["weights"]) == ["mlcweb.FoldLinearReshapes", "mlcweb.MixedPrecision"]


def test_tir_pipeline_adds_vector_loads_on_webgpu_only() -> None:
    from mlcweb_passes.webgpu.vector_storage import TIR_PIPELINE

    webgpu = {"kind": "webgpu"}
    assert mp.tir_pipeline(webgpu) == TIR_PIPELINE
    assert TIR_PIPELINE in tvm.tirx.compilation_pipeline.PIPELINE_MAP  # registered for tvm.compile
    assert mp.tir_pipeline(webgpu, mp.PipelineOptions(vector_loads=False)) == "default"
    assert mp.tir_pipeline("llvm") == "default" and mp.tir_pipeline("vulkan") == "default"


def test_extra_passes_join_their_phase() -> None:
    """A caller's passes run inside the phase they are given for: in ``weights`` after the layouts and
    before the convolution split, elsewhere at the phase's end."""
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    extra = {"weights": [mp.Float16Residuals()], "fuse": [mp.HoistNarrowingCasts()]}
    phases = mp.phases(cuda, mp.PipelineOptions(dtype="float16", gpu=H100), extra)
    assert _names(phases["weights"])[-2:] == ["mlcweb.Float16Residuals", "mlcweb.SplitKConv"]
    assert _names(phases["fuse"])[-1] == "mlcweb.HoistNarrowingCasts"
    with pytest.raises(ValueError, match="unknown phase"):
        mp.phases(cuda, extra={"lowering": []})
    with pytest.raises(ValueError, match="unknown phase"):
        mp.pipeline("llvm", after="lift")


def test_phases_print_for_a_target() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mlcweb_passes", "--target", "cuda", "--dtype", "float16"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert [line.split()[0] for line in out.splitlines()] == list(mp.PHASES)
    assert "mlcweb.WgmmaGemm" in out


def test_importing_the_library_does_not_import_mlcweb() -> None:
    code = (
        "import sys, mlcweb_passes; "
        "sys.exit(1 if any(m == 'mlcweb' or m.startswith('mlcweb.') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_docs_show_the_phases_the_code_builds() -> None:
    """docs/passes.md renders the phase lists from the code; this keeps the two the same."""
    from mlcweb_passes.pipeline import describe

    docs = (Path(__file__).resolve().parents[2] / "docs" / "passes.md").read_text()
    for target, dtype in (({"kind": "cuda", "arch": "sm_90"}, "float16"), ({"kind": "webgpu"}, "float16")):
        block = docs.split(f"<!-- phases: {target['kind']} {dtype} -->\n```\n", 1)[1].split("\n```", 1)[0]
        assert block == describe(target, mp.PipelineOptions(dtype=dtype, gpu=H100)), f"regenerate for {target}"

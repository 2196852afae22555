"""benchmarks/sd_bench.py's PyTorch-at-its-best column: the networks it runs compute what the eager ones
do (fused QKV projections, SDPA in CLIP, channels_last), the originals stay as they were, and the table's
ratio is against the fastest PyTorch column. Its speed is measured on the GPU machine (sd_gpu.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import sd_bench


def _nets():  # type: ignore[no-untyped-def]
    from mlcweb_stable_diffusion.models import load_networks

    return load_networks("tiny", None, 0)


def test_best_networks_compute_what_the_eager_ones_do() -> None:
    """Within 1e-4 of the networks as loaded (float32, CPU), and the loaded ones keep their attention."""
    from mlcweb_stable_diffusion.models import CLIPStage, UNetStage, VAEStage

    nets = _nets()
    best = sd_bench.best_networks(nets)
    assert nets.clip.config._attn_implementation == "eager" and best.clip.config._attn_implementation == "sdpa"
    fused = [m for m in best.unet.modules() if hasattr(m, "to_qkv")]
    assert fused and not any(hasattr(m, "to_qkv") for m in nets.unet.modules())
    torch.manual_seed(0)
    size = nets.latent_size
    latents = torch.randn(1, 4, size, size)
    ids = torch.randint(0, 1000, (1, 77), dtype=torch.int32)
    emb = torch.randn(2, 77, int(nets.clip.config.hidden_size))
    step, scale = torch.tensor(801, dtype=torch.int32), torch.tensor(7.5)
    last = torch.channels_last
    with torch.no_grad():
        pairs = [
            (CLIPStage(nets.clip)(ids), CLIPStage(best.clip)(ids)),
            (
                UNetStage(nets.unet)(latents, step, emb, scale),
                UNetStage(best.unet).to(memory_format=last)(latents.contiguous(memory_format=last), step, emb, scale),
            ),
            (VAEStage(nets.vae)(latents), VAEStage(best.vae).to(memory_format=last)(latents)),
        ]
    for want, got in pairs:
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-4 * float(want.abs().max()))


def test_graphed_copies_inputs_into_its_fixed_tensors() -> None:
    """On the CPU there is no graph: each call copies the values in and runs the function on them."""
    fixed = [torch.zeros(3), torch.ones(3)]
    calls: list[int] = []

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return a * 2 + b

    graphed = sd_bench.Graphed(fn, fixed, warmups=3)
    assert len(calls) == 3
    out = graphed(torch.tensor([1.0, 2.0, 3.0]))  # b stays the fixed ones
    assert out.tolist() == [3.0, 5.0, 7.0] and fixed[0].tolist() == [1.0, 2.0, 3.0]


def test_ratio_is_against_the_fastest_pytorch_column() -> None:
    row = {"mlcweb": 8.0, "torch_eager": 28.0, "torch_compile": 19.0, "torch_best": 6.4}
    assert sd_bench.fastest_torch(row) == "torch_best"
    assert sd_bench.fastest_torch({"mlcweb": 1.0}) is None
    record = {
        "options": {"size": "tiny", "target": "cuda", "dtype": "float16", "steps": 20},
        "latent_shape": [1, 4, 64, 64],
        "device": "H200",
        "date": "2026-12-05",
        "ms": {stage: dict(row) for stage in (*sd_bench.STAGES, "image")},
        "build": {"build_seconds": 1.0, "schedules": None},
        "accuracy": {},
        "image_mean_abs_diff_vs_torch_eager": 0.5,
    }
    table = sd_bench.markdown(record)
    assert "| UNet step (batch 2, guided) | 8.00 | 28.00 | 19.00 | 6.40 | torch_best | 0.80 |" in table

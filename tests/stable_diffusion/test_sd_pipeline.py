"""The compiled tiny Stable Diffusion against PyTorch / diffusers on the same weights and inputs.

Tolerances (float32 build): CLIP and UNet outputs within 1e-4 absolute (values of order 1; measured
1.1e-6 and 2.0e-5), one scheduler step within 1e-5, VAE and the final image within 1 of 255 per channel
(measured: identical). float16 build: CLIP within 2e-2 (measured 2.7e-3), guided UNet within 5e-2
(measured 1.4e-2), image within 4 of 255 and mean under 0.5 (measured max 1, mean 0.05).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from mlcweb_stable_diffusion.models import CLIPStage, Networks, UNetStage, VAEStage
from mlcweb_stable_diffusion.runner import StableDiffusion, initial_latents
from mlcweb_stable_diffusion.schedulers import SCHEDULERS
from testutil import sd_pipeline

from mlcweb.runtime import load

PROMPT, NEGATIVE = "a watercolor painting of a fox in the snow", "blurry, low quality"


def _pipeline(nets: Networks, sd: StableDiffusion, scheduler: str) -> StableDiffusionPipeline:
    pipe: StableDiffusionPipeline = sd_pipeline(nets, sd.tokenizer.hf, scheduler)
    return pipe


def _diffusers_image(
    nets: Networks, sd: StableDiffusion, scheduler: str, steps: int, latents: np.ndarray
) -> np.ndarray:
    pipe = _pipeline(nets, sd, scheduler)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=steps,
            guidance_scale=7.5,
            latents=torch.from_numpy(latents),
            output_type="np",
        ).images[0]
    return (out * 255).round().astype(np.uint8)


def _unet_step(sd: StableDiffusion, nets: Networks) -> tuple[np.ndarray, np.ndarray]:
    """One guided UNet step, compiled and in PyTorch, on the same random latents and embeddings."""
    rng = np.random.default_rng(1)
    latents = rng.standard_normal(sd.meta["latent_shape"]).astype(np.float32)
    emb = rng.standard_normal((2, 77, sd.meta["hidden_size"])).astype(np.float32)
    inputs = (latents, np.array(801, dtype=np.int32), emb, np.array(7.5, dtype=np.float32))
    expected = UNetStage(nets.unet)(*(torch.from_numpy(x) for x in inputs)).detach().numpy()
    got = sd._call("unet", *(sd._tensor(x) for x in inputs)).numpy()
    return got, expected


def test_clip_matches_transformers(sd_llvm: Path, nets: Networks) -> None:
    sd = StableDiffusion(load(sd_llvm))
    ids = sd.tokenizer(PROMPT)
    expected = CLIPStage(nets.clip)(torch.from_numpy(ids)).detach().numpy()
    got = sd._call("clip", sd._tensor(ids)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_one_guided_unet_step_matches_diffusers(sd_llvm: Path, nets: Networks) -> None:
    sd = StableDiffusion(load(sd_llvm))
    got, expected = _unet_step(sd, nets)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_one_scheduler_step_from_the_library_matches_diffusers(sd_llvm: Path, nets: Networks) -> None:
    sd = StableDiffusion(load(sd_llvm))
    consts = sd.scheduler_constants("dpm", 20)
    reference = SCHEDULERS["dpm"](nets.scheduler_config).diffusers()
    reference.set_timesteps(20)
    rng = np.random.default_rng(2)
    sample, eps = (rng.standard_normal(sd.meta["latent_shape"]).astype(np.float32) for _ in range(2))
    expected = reference.step(torch.from_numpy(eps), reference.timesteps[0], torch.from_numpy(sample)).prev_sample
    coeffs = np.asarray(consts["coeffs"][0], dtype=np.float32)
    zeros = np.zeros_like(sample)
    out, _ = sd._call("dpm_solver_step", *(sd._tensor(x) for x in (sample, eps, zeros, coeffs)))
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_vae_matches_diffusers_decode(sd_llvm: Path, nets: Networks) -> None:
    sd = StableDiffusion(load(sd_llvm))
    latents = np.random.default_rng(3).standard_normal(sd.meta["latent_shape"]).astype(np.float32)
    with torch.no_grad():
        image = nets.vae.decode(torch.from_numpy(latents) / nets.vae.config.scaling_factor).sample
    expected = ((image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    raw = sd._call("vae", sd._tensor(latents)).numpy()
    assert raw.shape == (*expected.shape[:2], 4) and np.array_equal(raw, np.round(raw))  # whole numbers
    got = raw.astype(np.uint8)
    assert (got[..., 3] == 255).all()
    assert np.abs(got[..., :3].astype(int) - expected.astype(int)).max() <= 1
    with torch.no_grad():
        stage = VAEStage(nets.vae)(torch.from_numpy(latents)).numpy()
    np.testing.assert_allclose(stage[..., :3], expected, atol=1)


@pytest.mark.parametrize(("scheduler", "steps"), [("dpm", 10), ("pndm", 10)])
def test_whole_image_matches_stable_diffusion_pipeline(
    sd_llvm: Path, nets: Networks, scheduler: str, steps: int
) -> None:
    sd = StableDiffusion(load(sd_llvm))
    latents = initial_latents(sd.meta["latent_shape"], seed=7)
    expected = _diffusers_image(nets, sd, scheduler, steps, latents)
    got = sd.generate(PROMPT, NEGATIVE, steps=steps, scheduler=scheduler, guidance=7.5, latents=latents).image
    diff = np.abs(got[..., :3].astype(int) - expected.astype(int))
    assert np.unique(expected).size > 50  # a real image, not a saturated one
    assert diff.max() <= 1, f"max {diff.max()}, mean {diff.mean():.4f}"


def test_seed_gives_the_latents_diffusers_draws(sd_llvm: Path, nets: Networks) -> None:
    sd = StableDiffusion(load(sd_llvm))
    by_seed = sd.generate(PROMPT, NEGATIVE, steps=4, scheduler="dpm", seed=11).image
    by_latents = sd.generate(
        PROMPT, NEGATIVE, steps=4, scheduler="dpm", latents=initial_latents(sd.meta["latent_shape"], 11)
    ).image
    np.testing.assert_array_equal(by_seed, by_latents)


def test_float16_components_within_tolerance(sd_llvm_fp16: Path, nets: Networks) -> None:
    sd = StableDiffusion(load(sd_llvm_fp16))
    ids = sd.tokenizer(PROMPT)
    expected = CLIPStage(nets.clip)(torch.from_numpy(ids)).detach().numpy()
    np.testing.assert_allclose(sd._call("clip", sd._tensor(ids)).numpy(), expected, rtol=0, atol=2e-2)
    got, expected = _unet_step(sd, nets)
    # guidance 7.5 amplifies the float16 error of (cond - uncond) 7.5 times
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-2)


@pytest.mark.parametrize("scheduler", ["dpm", "pndm"])
def test_float16_image_close_to_diffusers(sd_llvm_fp16: Path, nets: Networks, scheduler: str) -> None:
    # Measured on the tiny model: max 1, mean 0.05 of 255; the bound leaves room for other CPUs.
    sd = StableDiffusion(load(sd_llvm_fp16))
    latents = initial_latents(sd.meta["latent_shape"], seed=7)
    expected = _diffusers_image(nets, sd, scheduler, 10, latents)
    got = sd.generate(PROMPT, NEGATIVE, steps=10, scheduler=scheduler, latents=latents).image
    diff = np.abs(got[..., :3].astype(int) - expected.astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 4, f"max {diff.max()}, mean {diff.mean():.3f}"

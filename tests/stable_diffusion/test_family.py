"""The rest of the family (SD 2.1 with v-prediction, SD-Turbo, LCM, SDXL, SDXL-Turbo), compiled for llvm
in float32, against the matching diffusers pipeline on the same tiny random weights, prompt and seed.

Tolerance: the final uint8 image within 1 of 255 per channel, as for SD1.5 (measured: identical for
every case here). The seed goes to a torch generator on both sides: initial latents, then the noise of
each Euler-ancestral / LCM step, drawn in the same order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline
from mlcweb_stable_diffusion.models import (
    CLIPStage,
    EmbeddedGuidanceUNetStage,
    Networks,
    SingleUNetStage,
    load_networks,
)
from mlcweb_stable_diffusion.runner import StableDiffusion
from testutil import build_tiny_sd, sd_pipeline

from mlcweb.runtime import load

PROMPT, NEGATIVE = "a lighthouse on a cliff at dusk, oil painting", "blurry"
VARIANTS = ("sd2.1", "sd-turbo", "lcm", "sdxl", "sdxl-turbo")


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each variant built for llvm in float32 (about 20-30 s each on 2 cores)."""
    root = tmp_path_factory.mktemp("family")
    return {v: build_tiny_sd(root / v, "llvm", "float32", config={"variant": v}) for v in VARIANTS}


@pytest.fixture(scope="session")
def networks() -> dict[str, Networks]:
    return {v: load_networks("tiny", None, 0, v) for v in VARIANTS}


def _pipeline(nets: Networks, sd: StableDiffusion, scheduler: str) -> Any:
    cls = LatentConsistencyModelPipeline if scheduler == "lcm" else None
    second = None if sd.tokenizer_2 is None else sd.tokenizer_2.hf
    return sd_pipeline(nets, sd.tokenizer.hf, scheduler, cls, tokenizer_2=second)


def _diffusers_image(
    nets: Networks, sd: StableDiffusion, scheduler: str, steps: int, guidance: float, negative: str | None = NEGATIVE
) -> np.ndarray:
    kwargs: dict[str, Any] = {} if scheduler == "lcm" else {"negative_prompt": negative}
    return _run(_pipeline(nets, sd, scheduler), steps=steps, guidance=guidance, **kwargs)


def _run(pipe: Any, steps: int, guidance: float, **kwargs: Any) -> np.ndarray:
    """The uint8 image of ``pipe`` for PROMPT with seed 5."""
    with torch.no_grad():
        out = pipe(
            PROMPT,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(5),
            output_type="np",
            **kwargs,
        ).images[0]
    return (out * 255).round().astype(np.uint8)


CASES = [
    ("sd2.1", "dpm", 20, 7.5),  # v-prediction through each compiled scheduler
    ("sd2.1", "pndm", 20, 7.5),
    ("sd2.1", "euler_a", 10, 5.0),
    ("sd2.1", "dpm", 10, 1.0),  # guidance 1: no CFG in diffusers; the guided unet at scale 1 here
    ("sd-turbo", "euler_a", 1, 0.0),  # the one-step path: unet_single, trailing Euler-ancestral
    ("sd-turbo", "euler_a", 4, 0.0),
    ("sd-turbo", "euler", 4, 0.0),
    ("sd-turbo", "euler_a", 2, 3.0),  # a turbo build keeps the guided unet for scales above 1
    ("lcm", "lcm", 4, 8.0),  # guidance as the UNet's embedding; noise between steps
    ("lcm", "lcm", 1, 8.0),
    ("lcm", "lcm", 8, 3.0),
    ("sdxl", "euler", 10, 5.0),  # two text encoders, pooled embedding and size ids into the UNet
    ("sdxl", "dpm", 10, 5.0),
    ("sdxl-turbo", "euler_a", 1, 0.0),
    ("sdxl-turbo", "euler_a", 4, 0.0),
]


@pytest.mark.parametrize(("variant", "scheduler", "steps", "guidance"), CASES)
def test_image_matches_the_diffusers_pipeline(
    family: dict[str, Path], networks: dict[str, Networks], variant: str, scheduler: str, steps: int, guidance: float
) -> None:
    sd = StableDiffusion(load(family[variant]))
    expected = _diffusers_image(networks[variant], sd, scheduler, steps, guidance)
    got = sd.generate(PROMPT, NEGATIVE, steps=steps, scheduler=scheduler, guidance=guidance, seed=5).image
    diff = np.abs(got[..., :3].astype(int) - expected.astype(int))
    assert np.unique(expected).size > 50  # a real image, not a saturated one
    assert diff.max() <= 1, f"max {diff.max()}, mean {diff.mean():.4f}"


def test_sdxl_without_a_negative_prompt_guides_against_zeros(
    family: dict[str, Path], networks: dict[str, Networks]
) -> None:
    """diffusers' SDXL pipelines, given no negative prompt, use zero embeddings for it
    (force_zeros_for_empty_prompt); an empty negative prompt here does the same."""
    sd = StableDiffusion(load(family["sdxl"]))
    expected = _diffusers_image(networks["sdxl"], sd, "euler", 10, 5.0, negative=None)
    got = sd.generate(PROMPT, "", steps=10, scheduler="euler", guidance=5.0, seed=5).image
    assert np.abs(got[..., :3].astype(int) - expected.astype(int)).max() <= 1
    with_text = sd.generate(PROMPT, NEGATIVE, steps=10, scheduler="euler", guidance=5.0, seed=5).image
    assert np.abs(with_text.astype(int) - got.astype(int)).max() > 1  # the negative prompt matters


def test_defaults_come_from_the_variant(family: dict[str, Path], networks: dict[str, Networks]) -> None:
    """With no steps, scheduler or guidance given, SD-Turbo makes its one-step guidance-free image."""
    sd = StableDiffusion(load(family["sd-turbo"]))
    assert sd.defaults == {"scheduler": "euler_a", "steps": 1, "guidance": 0.0, "guidance_free": True}
    expected = _diffusers_image(networks["sd-turbo"], sd, "euler_a", 1, 0.0)
    got = sd.generate(PROMPT, seed=5).image
    assert np.abs(got[..., :3].astype(int) - expected.astype(int)).max() <= 1


def test_components_match_torch(family: dict[str, Path], networks: dict[str, Networks]) -> None:
    """SD2's GELU text encoder, the batch-one UNet and LCM's guidance-embedded UNet, one call each."""
    rng = np.random.default_rng(0)
    sd2 = StableDiffusion(load(family["sd2.1"]))
    ids = sd2.tokenizer(PROMPT + "!!")  # SD 2.x pads with "!", which is id 0, as is "!" in a prompt
    assert ids[0, -1] == 0 and sd2.meta["pad_token_id"] == 0
    expected = CLIPStage(networks["sd2.1"].clip)(torch.from_numpy(ids)).detach().numpy()
    np.testing.assert_allclose(sd2._call("clip", sd2._tensor(ids)).numpy(), expected, rtol=0, atol=1e-4)

    for variant, stage, extra in (
        ("sd-turbo", SingleUNetStage, []),
        ("lcm", EmbeddedGuidanceUNetStage, [np.array(6.0, dtype=np.float32)]),
    ):
        sd = StableDiffusion(load(family[variant]))
        latents = rng.standard_normal(sd.meta["latent_shape"]).astype(np.float32)
        emb = rng.standard_normal((1, 77, sd.meta["hidden_size"])).astype(np.float32)
        inputs = [latents, np.array(501, dtype=np.int32), emb, *extra]
        with torch.no_grad():
            want = stage(networks[variant].unet)(*(torch.from_numpy(x) for x in inputs)).numpy()
        got = sd._call("unet_single", *(sd._tensor(x) for x in inputs)).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_unet_functions_share_one_copy_of_the_weights(family: dict[str, Path]) -> None:
    """unet_single stores only the weights whose lifted form differs from unet's (the batch-broadcast
    linear projections of SD 2.x's transformers), nothing else twice."""
    manifest = json.loads((family["sd-turbo"] / "manifest.json").read_text())
    functions = manifest["functions"]
    single, guided = functions["unet_single"]["params"], functions["unet"]["params"]
    own = [n for n in single if n.startswith("unet_single/")]
    assert len(single) == len(guided) and len(own) <= len(single) // 10, own
    stored = json.loads((family["sd-turbo"] / "tensor-cache.json").read_text())
    records = {rec["name"]: rec for shard in stored["records"] for rec in shard["records"]}
    assert set(records) == {n for f in functions.values() for n in f["params"]}
    own_bytes = sum(records[n]["nbytes"] for n in own)
    assert own_bytes < 0.05 * sum(records[n]["nbytes"] for n in guided)
    lcm = json.loads((family["lcm"] / "manifest.json").read_text())
    assert "unet" not in lcm["functions"] and "concat_embeddings" not in lcm["functions"]
    assert [i["name"] for i in lcm["functions"]["unet_single"]["inputs"]][-1] == "guidance"


def init_image(h: int, w: int) -> np.ndarray:
    """A deterministic RGB test image: gradients plus seeded noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    noise = rng.integers(0, 64, (h, w))
    return np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (h + w) + noise], -1).astype(np.uint8)


def diffusers_img2img(
    nets: Networks, sd: StableDiffusion, scheduler: str, steps: int, guidance: float, strength: float
) -> np.ndarray:
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    text2img = _pipeline(nets, sd, scheduler)
    if nets.clip2 is not None:
        pipe = StableDiffusionXLImg2ImgPipeline(**text2img.components, requires_aesthetics_score=False)
    else:
        pipe = StableDiffusionImg2ImgPipeline(**text2img.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    h, w = sd.meta["image_shape"][:2]
    image = Image.fromarray(init_image(h, w))
    return _run(pipe, steps, guidance, image=image, negative_prompt=NEGATIVE, strength=strength)


IMG2IMG = [
    ("sd2.1", "dpm", 10, 7.5, 0.6),  # v-prediction; DPM starts first-order part-way through
    ("sd-turbo", "euler_a", 2, 0.0, 0.5),  # SD-Turbo's image-to-image: steps x strength >= 1
    ("sd-turbo", "euler", 4, 0.0, 0.75),
    ("sdxl-turbo", "euler_a", 2, 0.0, 0.5),
]


@pytest.mark.parametrize(("variant", "scheduler", "steps", "guidance", "strength"), IMG2IMG)
def test_image_to_image_matches_the_diffusers_pipeline(
    family: dict[str, Path],
    networks: dict[str, Networks],
    variant: str,
    scheduler: str,
    steps: int,
    guidance: float,
    strength: float,
) -> None:
    """The compiled VAE encoder (sampled with the generator's first draw), add_noise at the start step
    and the tail of the schedule against StableDiffusion(XL)Img2ImgPipeline."""
    sd = StableDiffusion(load(family[variant]))
    expected = diffusers_img2img(networks[variant], sd, scheduler, steps, guidance, strength)
    h, w = sd.meta["image_shape"][:2]
    got = sd.generate(
        PROMPT,
        NEGATIVE,
        steps=steps,
        scheduler=scheduler,
        guidance=guidance,
        seed=5,
        init_image=init_image(h, w),
        strength=strength,
    ).image
    diff = np.abs(got[..., :3].astype(int) - expected.astype(int))
    assert diff.max() <= 1, f"max {diff.max()}, mean {diff.mean():.4f}"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"strength": 0.0}, r"--strength must be a number in \(0, 1\]"),
        ({"strength": 1.5}, r"--strength must be a number in \(0, 1\]"),
        ({"strength": 0.2, "steps": 2}, "runs no step"),
        ({"scheduler": "pndm", "steps": 20}, "runs with dpm, euler or euler_a, not pndm"),
        ({"image": (8, 8, 3)}, r"this build takes \(32, 32, 3\) RGB"),
    ],
)
def test_image_to_image_requests_that_cannot_run_are_one_line(
    family: dict[str, Path], change: dict[str, Any], message: str
) -> None:
    from mlcweb.errors import MlcwebError

    sd = StableDiffusion(load(family["sd2.1"]))
    image = init_image(*change.pop("image", (32, 32, 3))[:2])
    args: dict[str, Any] = {"steps": 10, "scheduler": "dpm", "strength": 0.5, **change}
    with pytest.raises(MlcwebError, match=message):
        sd.generate(PROMPT, init_image=image, **args)


def test_sdxl_float16_keeps_its_vae_in_float32(
    tmp_path_factory: pytest.TempPathFactory, networks: dict[str, Networks], family: dict[str, Path]
) -> None:
    """SDXL's VAE overflows float16 (diffusers upcasts it, force_upcast): in a float16 build the UNet and
    text encoders store float16 weights, the VAE float32 ones, and the image stays within the float16
    tolerance of SD1.5's build (4 of 255, mean under 0.5)."""
    out = build_tiny_sd(tmp_path_factory.mktemp("sdxl16") / "b", "llvm", "float16", config={"variant": "sdxl"})
    cache = json.loads((out / "tensor-cache.json").read_text())
    dtypes = {rec["name"]: rec["dtype"] for shard in cache["records"] for rec in shard["records"]}
    functions = json.loads((out / "manifest.json").read_text())["functions"]
    for func, want in (("vae", "float32"), ("vae_encode", "float32"), ("unet", "float16")):
        kinds = {dtypes[n] for n in functions[func]["params"] if len(n) and dtypes[n].startswith("float")}
        assert want in kinds and (want == "float16" or kinds == {"float32"}), (func, kinds)
    sd = StableDiffusion(load(out))
    expected = _diffusers_image(networks["sdxl"], StableDiffusion(load(family["sdxl"])), "euler", 10, 5.0)
    got = sd.generate(PROMPT, NEGATIVE, steps=10, scheduler="euler", guidance=5.0, seed=5).image
    diff = np.abs(got[..., :3].astype(int) - expected.astype(int))
    assert diff.max() <= 4 and diff.mean() < 0.5, f"max {diff.max()}, mean {diff.mean():.3f}"

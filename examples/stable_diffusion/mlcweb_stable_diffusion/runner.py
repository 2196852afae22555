"""Text to image with the native runtime: tokenizer -> CLIP -> UNet + scheduler loop -> VAE."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tvm
from tqdm import tqdm

from mlcweb.errors import MlcwebError
from mlcweb.runtime import Artifacts

from .schedulers import SCHEDULERS, HostLoop
from .tokenizer import END_OF_TEXT, Tokenizer

__all__ = ["Generation", "StableDiffusion", "initial_latents"]

log = logging.getLogger(__name__)


def initial_latents(shape: list[int], seed: int, init_noise_sigma: float = 1.0) -> np.ndarray:
    """The latents diffusers' pipeline starts from with ``generator=torch.Generator().manual_seed(seed)``."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float32) * init_noise_sigma).numpy()


@dataclass
class Generation:
    image: np.ndarray  # uint8 (H, W, 4)
    seconds: dict[str, float] = field(default_factory=dict)

    def save_png(self, path: Path) -> None:
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(self.image, mode="RGBA").save(tmp, format="PNG")
        tmp.replace(path)


MAX_SEED = 2**32 - 1  # the page's generator is seeded with 32 bits; deploy.py takes the same range
MAX_GUIDANCE = 100.0


def check_request(prompt: str, negative_prompt: str, steps: int, guidance: float, seed: int, train_steps: int) -> None:
    """Refuse, in one line each, what would give a garbage image or a traceback: steps past half the
    training schedule (DPM-Solver's coefficients turn NaN near its end, PNDM runs out of timesteps),
    a guidance scale that is not a finite number in ``[0, 100]``, a seed outside ``[0, 2**32 - 1]``, a
    prompt that is not text."""
    max_steps = train_steps // 2
    if not 1 <= steps <= max_steps:
        raise MlcwebError(f"--steps must be between 1 and {max_steps}, not {steps}")
    if not math.isfinite(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
        raise MlcwebError(f"--guidance must be a number between 0 and {MAX_GUIDANCE:g}, not {guidance}")
    if not 0 <= seed <= MAX_SEED:
        raise MlcwebError(f"--seed must be between 0 and {MAX_SEED}, not {seed}")
    for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise MlcwebError(f"the {name} is not valid UTF-8 text (byte {err.start}); pass it as UTF-8") from err


class StableDiffusion:
    """The generation loop over an artifact directory built from the ``stable-diffusion`` model."""

    def __init__(self, artifacts: Artifacts) -> None:
        if artifacts.manifest["model"] != "stable-diffusion":
            raise MlcwebError(f"{artifacts.root} holds {artifacts.manifest['model']!r}, not stable-diffusion")
        self.arts = artifacts
        self.meta = artifacts.manifest["metadata"]
        self.tokenizer = Tokenizer(artifacts.root / "tokenizer", self.meta.get("pad_token", END_OF_TEXT))
        # SDXL's second text encoder has its own tokenizer (padding with "!")
        self.tokenizer_2 = (
            Tokenizer(artifacts.root / "tokenizer_2", self.meta["pad_token_2"]) if "pad_token_2" in self.meta else None
        )
        # builds before the family had no defaults: SD1.5's
        self.defaults: dict[str, Any] = self.meta.get(
            "defaults", {"scheduler": "dpm", "steps": 20, "guidance": 7.5, "guidance_free": False}
        )
        self.device = artifacts.device

    def _call(self, func: str, *args: tvm.runtime.Tensor) -> Any:
        return self.arts.vm[func](*args, *self.arts.params[func])

    def _tensor(self, array: np.ndarray) -> tvm.runtime.Tensor:
        return tvm.runtime.tensor(np.require(array, requirements="C"), self.device)

    def scheduler_constants(self, scheduler: str, steps: int) -> dict[str, Any]:
        if scheduler not in SCHEDULERS:
            raise MlcwebError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        saved = self.arts.root / f"scheduler-{scheduler}-{steps}.json"
        if saved.is_file():
            data: dict[str, Any] = json.loads(saved.read_text())
            return data
        log.info("no %s; computing %s constants for %d steps", saved.name, scheduler, steps)
        return SCHEDULERS[scheduler](self.meta["scheduler_config"]).constants(steps)

    def text(self, prompt: str) -> list[tvm.runtime.Tensor]:
        """The prompt's embeddings for ``unet_single``: ``[hidden states]``, for SDXL ``[hidden, pooled]``."""
        if self.tokenizer_2 is None:
            return [self._call("clip", self._tensor(self.tokenizer(prompt)))]
        out = self._call("clip", self._tensor(self.tokenizer(prompt)), self._tensor(self.tokenizer_2(prompt)))
        return [out[0], out[1]]

    def encode(self, prompt: str, negative_prompt: str = "") -> list[tvm.runtime.Tensor]:
        """Embeddings for the guided ``unet``: the negative prompt's, then the prompt's. SDXL, as its
        diffusers pipelines with no negative prompt, uses zeros for an empty one
        (``force_zeros_for_empty_prompt``)."""
        cond = self.text(prompt)
        if self.tokenizer_2 is not None and not negative_prompt and self.meta.get("force_zeros_for_empty_prompt"):
            uncond = [self._tensor(np.zeros(tuple(int(d) for d in t.shape), dtype=np.float32)) for t in cond]
        else:
            uncond = self.text(negative_prompt)
        out = self._call("concat_embeddings", *(x for pair in zip(uncond, cond, strict=True) for x in pair))
        return [out] if len(cond) == 1 else [out[0], out[1]]

    def img2img_start(self, consts: dict[str, Any], steps: int, strength: float, image: np.ndarray) -> int:
        """The step image-to-image starts at, after checking the request (one clear line each)."""
        if "vae_encode" not in self.arts.functions:
            raise MlcwebError(f"{self.arts.root} has no VAE encoder (built before image-to-image); rebuild it")
        if "add_noise" not in consts:
            raise MlcwebError(f"image-to-image runs with dpm, euler or euler_a, not {consts['scheduler']}")
        if not math.isfinite(strength) or not 0 < strength <= 1:
            raise MlcwebError(f"--strength must be a number in (0, 1], not {strength}")
        kept = min(int(steps * strength), steps)
        if kept < 1:
            raise MlcwebError(f"--strength {strength} of {steps} steps runs no step; raise --strength or --steps")
        h, w = self.meta["image_shape"][:2]
        if image.shape != (h, w, 3):
            raise MlcwebError(f"the init image is {image.shape}; this build takes ({h}, {w}, 3) RGB")
        return steps - kept

    def encode_image(
        self, image: np.ndarray, consts: dict[str, Any], first: int, generator: torch.Generator
    ) -> np.ndarray:
        """The latents at step ``first`` from ``image``: encoded, then noised with ``add_noise``."""
        shape = self.meta["latent_shape"]
        sample_noise = torch.randn(shape, generator=generator).numpy()
        encoded = self._call("vae_encode", self._tensor(image.astype(np.float32)), self._tensor(sample_noise))
        noise = torch.randn(shape, generator=generator).numpy()
        a, b = consts["add_noise"][first]
        return (np.float32(a) * encoded.numpy() + np.float32(b) * noise).astype(np.float32)

    def unet_call(self, guidance: float) -> tuple[str, bool]:
        """Which UNet function runs the steps, and whether it takes the guidance scale. As in diffusers,
        a scale of 1 or less means no guidance: ``unet_single`` where the build has one (else the guided
        ``unet`` at scale 1, the same prediction); LCM's ``unet_single`` takes the scale as an input."""
        if self.meta.get("guidance_embedding"):
            return "unet_single", True
        if "unet_single" in self.arts.functions and (guidance <= 1 or "unet" not in self.arts.functions):
            return "unet_single", False
        return "unet", True

    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        steps: int | None = None,
        scheduler: str | None = None,
        guidance: float | None = None,
        seed: int = 0,
        latents: np.ndarray | None = None,
        init_image: np.ndarray | None = None,
        strength: float = 0.8,
        progress: bool = False,
    ) -> Generation:
        """One image. ``steps``, ``scheduler`` and ``guidance`` default to the model's (``defaults`` in the
        build's metadata); ``seed`` seeds a torch generator as diffusers' pipelines do: the initial
        latents (unless ``latents`` is given), then the noise of each step that adds some.

        Image-to-image: ``init_image`` (H, W, 3) RGB 0..255 at the build's image size is encoded (the
        encoder's sample drawn first from the generator, then the noise added at the start step) and
        denoised from step ``steps - int(steps * strength)`` on, as diffusers' img2img pipelines do."""
        steps = self.defaults["steps"] if steps is None else steps
        scheduler = self.defaults["scheduler"] if scheduler is None else scheduler
        guidance = float(self.defaults["guidance"] if guidance is None else guidance)
        train_steps = int(self.meta["scheduler_config"].get("num_train_timesteps", 1000))
        check_request(prompt, negative_prompt, steps, guidance, seed, train_steps)
        seconds: dict[str, float] = {}
        consts = self.scheduler_constants(scheduler, steps)
        first = 0 if init_image is None else self.img2img_start(consts, steps, strength, init_image)
        unet, takes_scale = self.unet_call(guidance)
        if unet == "unet":
            guidance = max(guidance, 1.0)
        start = time.perf_counter()
        embeddings = self.encode(prompt, negative_prompt) if unet == "unet" else self.text(prompt)
        self.device.sync()
        seconds["clip"] = time.perf_counter() - start

        shape = self.meta["latent_shape"]
        generator = torch.Generator().manual_seed(seed)
        if init_image is not None:
            latents = self.encode_image(init_image, consts, first, generator)
        elif latents is None:
            latents = (torch.randn(shape, generator=generator) * consts["init_noise_sigma"]).numpy()
        loop = HostLoop(consts, np.zeros(shape, dtype=np.float32), start=first)
        sample = self._tensor(latents.astype(np.float32))
        model_input = self._tensor(loop.first_input(latents.astype(np.float32)))
        scale = [self._tensor(np.array(guidance, dtype=np.float32))] if takes_scale else []

        def noise() -> tvm.runtime.Tensor:
            return self._tensor(torch.randn(shape, generator=generator).numpy())

        start = time.perf_counter()
        timesteps = consts["timesteps"]
        for i in tqdm(range(first, len(timesteps)), desc="denoising", unit="step", disable=not progress):
            timestep = self._tensor(np.array(timesteps[i], dtype=np.int32))
            eps = self._call(unet, model_input, timestep, *embeddings, *scale)
            sample, model_input = loop.step(self._call, i, sample, eps, self._tensor, noise)
        self.device.sync()
        seconds["unet+scheduler"] = time.perf_counter() - start
        seconds["per step"] = seconds["unet+scheduler"] / (len(timesteps) - first)

        start = time.perf_counter()
        image = self._call("vae", sample).numpy().astype(np.uint8)  # whole numbers 0..255 in float32
        seconds["vae"] = time.perf_counter() - start
        return Generation(image, seconds)

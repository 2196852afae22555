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
from .tokenizer import Tokenizer

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
        self.tokenizer = Tokenizer(artifacts.root / "tokenizer")
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

    def encode(self, prompt: str, negative_prompt: str = "") -> tvm.runtime.Tensor:
        cond = self._call("clip", self._tensor(self.tokenizer(prompt)))
        uncond = self._call("clip", self._tensor(self.tokenizer(negative_prompt)))
        return self._call("concat_embeddings", uncond, cond)

    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        steps: int = 20,
        scheduler: str = "dpm",
        guidance: float = 7.5,
        seed: int = 0,
        latents: np.ndarray | None = None,
        progress: bool = False,
    ) -> Generation:
        train_steps = int(self.meta["scheduler_config"].get("num_train_timesteps", 1000))
        check_request(prompt, negative_prompt, steps, guidance, seed, train_steps)
        seconds: dict[str, float] = {}
        consts = self.scheduler_constants(scheduler, steps)
        start = time.perf_counter()
        embeddings = self.encode(prompt, negative_prompt)
        self.device.sync()
        seconds["clip"] = time.perf_counter() - start

        shape = self.meta["latent_shape"]
        init = latents if latents is not None else initial_latents(shape, seed, consts["init_noise_sigma"])
        sample = self._tensor(init.astype(np.float32))
        loop = HostLoop(consts, np.zeros(shape, dtype=np.float32))
        scale = self._tensor(np.array(guidance, dtype=np.float32))
        start = time.perf_counter()
        for i, t in enumerate(tqdm(consts["timesteps"], desc="denoising", unit="step", disable=not progress)):
            eps = self._call("unet", sample, self._tensor(np.array(t, dtype=np.int32)), embeddings, scale)
            sample = loop.step(self._call, i, sample, eps, self._tensor)
        self.device.sync()
        seconds["unet+scheduler"] = time.perf_counter() - start
        seconds["per step"] = seconds["unet+scheduler"] / len(consts["timesteps"])

        start = time.perf_counter()
        image = self._call("vae", sample).numpy().astype(np.uint8)  # whole numbers 0..255 in float32
        seconds["vae"] = time.perf_counter() - start
        return Generation(image, seconds)

"""The Stable Diffusion family: which model a build is, told by name (random weights) or by its folder.

A :class:`Variant` is what the rest of the plugin needs to know about a model beyond its networks'
configs: the architecture (``sd1``, ``sd2``), what the UNet predicts, which UNet functions to compile
(the classifier-free-guidance ``unet`` with a batch of two, the batch-one ``unet_single`` of guidance-free
models, or both), and the defaults a user starts from (scheduler, steps, guidance). Random-weight builds
name one (``--set variant=sd2.1``); a diffusers folder is recognised from its configs by :func:`detect`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from mlcweb.errors import MlcwebError

__all__ = ["VARIANTS", "Variant", "detect", "variant_named"]

_SCALED_LINEAR: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
}
# SD1.5's scheduler/scheduler_config.json (PNDM), from which the pipelines derive the others.
SD15_SCHEDULER: dict[str, Any] = {
    **_SCALED_LINEAR,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}
# SD 2.1 (768x768) ships DDIM with v-prediction.
SD21_SCHEDULER: dict[str, Any] = {**SD15_SCHEDULER, "prediction_type": "v_prediction"}
# SD-Turbo: Euler with trailing timesteps (one step starts at t=999).
TURBO_SCHEDULER: dict[str, Any] = {
    **_SCALED_LINEAR,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "use_karras_sigmas": False,
}
# SDXL base: Euler over leading timesteps.
SDXL_SCHEDULER: dict[str, Any] = {
    **_SCALED_LINEAR,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
# SDXL-Turbo: Euler-ancestral over trailing timesteps.
SDXL_TURBO_SCHEDULER: dict[str, Any] = {**SDXL_SCHEDULER, "timestep_spacing": "trailing"}
# LCM-distilled SD1.5 (LCM_Dreamshaper_v7): the LCM scheduler over 50 original steps.
LCM_SCHEDULER: dict[str, Any] = {
    **_SCALED_LINEAR,
    "clip_sample": False,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
}


@dataclass(frozen=True)
class Variant:
    """One member of the family. ``unets`` names the UNet functions a build compiles; ``steps`` the
    scheduler constants written per scheduler (the first scheduler and its first count are the default)."""

    name: str
    architecture: str  # "sd1", "sd2" or "sdxl"
    description: str
    scheduler_config: dict[str, Any]
    steps: dict[str, list[int]]
    guidance: float
    unets: tuple[str, ...] = ("unet",)
    # LCM: the guidance scale goes into the UNet as an embedding (time_cond_proj_dim), not through CFG
    guidance_embedding: bool = False
    unet_config: dict[str, Any] = field(default_factory=dict)  # on top of the architecture's
    full_sample_size: int | None = None  # latent size of --set size=full, if not the architecture's
    pad_token: str = "<|endoftext|>"

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def default_scheduler(self) -> str:
        return next(iter(self.steps))

    def defaults(self) -> dict[str, Any]:
        """What hosts start from: written into the build's metadata, read by deploy.py and the page."""
        return {
            "scheduler": self.default_scheduler,
            "steps": self.steps[self.default_scheduler][0],
            "guidance": self.guidance,
            "guidance_free": "unet" not in self.unets or self.guidance <= 1,
        }


_CFG_STEPS = {"dpm": [20, 10], "pndm": [50, 20], "euler_a": [30]}
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("sd1.5", "sd1", "Stable Diffusion v1.5", SD15_SCHEDULER, _CFG_STEPS, 7.5),
        Variant(
            "sd2.1",
            "sd2",
            "Stable Diffusion 2.1 (OpenCLIP-H text encoder, v-prediction, 768x768)",
            SD21_SCHEDULER,
            _CFG_STEPS,
            7.5,
            pad_token="!",
        ),
        Variant(
            "sd-turbo",
            "sd2",
            "SD-Turbo (SD 2.1 distilled: 1-4 steps, no guidance, 512x512)",
            TURBO_SCHEDULER,
            {"euler_a": [1, 2, 4], "euler": [1, 4]},
            0.0,
            unets=("unet_single", "unet"),
            full_sample_size=64,
            pad_token="!",
        ),
        Variant(
            "lcm",
            "sd1",
            "Latent Consistency Model (SD1.5 distilled: 4-8 steps, guidance as a UNet input)",
            LCM_SCHEDULER,
            {"lcm": [4, 8, 2, 1]},
            8.0,
            unets=("unet_single",),
            guidance_embedding=True,
            unet_config={"time_cond_proj_dim": 256},
        ),
        Variant(
            "sdxl",
            "sdxl",
            "Stable Diffusion XL base (two text encoders, size-conditioned UNet, 1024x1024)",
            SDXL_SCHEDULER,
            {"euler": [30, 20], "dpm": [20], "euler_a": [30]},
            5.0,
        ),
        Variant(
            "sdxl-turbo",
            "sdxl",
            "SDXL-Turbo (SDXL distilled: 1-4 steps, no guidance, 512x512)",
            SDXL_TURBO_SCHEDULER,
            {"euler_a": [1, 2, 4]},
            0.0,
            unets=("unet_single", "unet"),
            full_sample_size=64,
        ),
    )
}


def variant_named(name: object) -> Variant:
    if not isinstance(name, str) or name not in VARIANTS:
        raise MlcwebError(f"--set variant={name!r} is not one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


# diffusers pipeline classes a folder may name, and what they say.
_PIPELINES = {
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "LatentConsistencyModelPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
}
_SCHEDULER_CLASSES = {
    "PNDMScheduler": "pndm",
    "DDIMScheduler": "dpm",
    "DPMSolverMultistepScheduler": "dpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "LCMScheduler": "lcm",
}


def detect(
    model_index: dict[str, Any] | None,
    unet: dict[str, Any],
    text_encoder: dict[str, Any],
    scheduler: dict[str, Any],
    where: str,
) -> Variant:
    """The variant a diffusers folder holds, from ``model_index.json`` (may be absent) and the configs of
    its UNet, text encoder and scheduler; a model the plugin cannot build is one error naming why."""
    pipeline = (model_index or {}).get("_class_name")
    if pipeline is not None and pipeline not in _PIPELINES:
        raise MlcwebError(f"{where} holds a {pipeline}; this plugin builds {', '.join(sorted(_PIPELINES))} folders")
    added = unet.get("addition_embed_type")
    if added not in (None, "text_time"):
        raise MlcwebError(
            f"{where}/unet uses added embeddings of type {added!r}; this plugin builds SD 1.x, 2.x and SDXL "
            "UNets (none, or SDXL's 'text_time')"
        )
    if pipeline is not None and ("XL" in pipeline) != (added == "text_time"):
        raise MlcwebError(f"{where} names a {pipeline}, but its UNet's added embeddings are {added!r}")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise MlcwebError(f"{where}/scheduler predicts {prediction!r}; supported: epsilon, v_prediction")
    sched_class = scheduler.get("_class_name", "PNDMScheduler")
    if sched_class not in _SCHEDULER_CLASSES:
        raise MlcwebError(
            f"{where}/scheduler is a {sched_class}; this plugin computes {', '.join(sorted(_SCHEDULER_CLASSES))}"
        )
    hidden_act = text_encoder.get("hidden_act", "quick_gelu")
    if added == "text_time":
        architecture = "sdxl"
    else:
        architecture = "sd2" if hidden_act == "gelu" or unet.get("use_linear_projection") else "sd1"
    lcm = unet.get("time_cond_proj_dim") is not None or sched_class == "LCMScheduler"
    if lcm and architecture == "sdxl":
        raise MlcwebError(f"{where} is an LCM-distilled SDXL; this plugin builds LCM for SD 1.x and 2.x")
    if lcm:
        base = VARIANTS["lcm"]
    elif scheduler.get("timestep_spacing") == "trailing" and sched_class.startswith("Euler"):
        # distilled few-step: trailing Euler, no guidance
        base = VARIANTS["sdxl-turbo" if architecture == "sdxl" else "sd-turbo"]
    else:
        base = VARIANTS[{"sd1": "sd1.5", "sd2": "sd2.1", "sdxl": "sdxl"}[architecture]]
    if lcm and unet.get("time_cond_proj_dim") is None:
        base = replace(base, unets=("unet",), guidance_embedding=False, steps={"lcm": [4, 8]}, guidance=1.0)
    steps = dict(base.steps)
    own = _SCHEDULER_CLASSES[sched_class]
    if own not in steps and own in ("dpm", "pndm", "euler", "euler_a"):
        steps = {own: [20], **steps}
    return replace(
        base,
        name=base.name,  # the kind, not the path: manifests stay the same wherever the folder lives
        architecture=architecture,
        scheduler_config=dict(scheduler),
        steps=steps,
        unet_config={},
    )

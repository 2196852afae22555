"""The three networks of Stable Diffusion 1.x / 2.x and the torch wrappers that are exported to Relax.

``size="tiny"`` builds seeded random-weight models from small configs with the same classes as the real
ones (diffusers ``UNet2DConditionModel``, ``AutoencoderKL``, transformers ``CLIPTextModel``), so the whole
pipeline compiles and runs in minutes on a CPU; ``size="full"`` builds the real architecture with random
weights (512x512 images for SD1.5, 768x768 for SD 2.1); the variant (:mod:`.variants`) picks the
architecture; a diffusers folder (``--model PATH``) gives the real weights and its variant is detected.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from mlcweb.errors import MlcwebError

from .tokenizer import check_tokenizer_folder
from .variants import VARIANTS, Variant, detect, variant_named

__all__ = [
    "CLIPStage",
    "EmbeddedGuidanceUNetStage",
    "Networks",
    "SDXLSingleUNetStage",
    "SDXLTextStage",
    "SDXLUNetStage",
    "SingleUNetStage",
    "UNetStage",
    "VAEEncodeStage",
    "VAEStage",
    "load_networks",
]

_TINY_UNET: dict[str, Any] = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
_TINY_VAE: dict[str, Any] = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=32,
)
_TINY_CLIP: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    vocab_size=49408,
)
# The SD1.5 architecture (runwayml/stable-diffusion-v1-5 configs).
_FULL_UNET: dict[str, Any] = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
_FULL_VAE: dict[str, Any] = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
)
_FULL_CLIP: dict[str, Any] = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    vocab_size=49408,
    projection_dim=768,
)
# SD 2.x on top of SD1's: OpenCLIP-H as diffusers ships it (a CLIPTextModel with GELU, already cut to the
# penultimate layer), linear projections in and out of the transformers, head counts per block.
_SD2_TINY_UNET: dict[str, Any] = dict(use_linear_projection=True, attention_head_dim=(2, 4))
_SD2_TINY_CLIP: dict[str, Any] = dict(hidden_act="gelu")
_SD2_FULL_UNET: dict[str, Any] = dict(
    sample_size=96,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    upcast_attention=True,
)
_SD2_FULL_CLIP: dict[str, Any] = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=512,
)
# SDXL: a UNet of three levels with added "text_time" embeddings (the pooled text embedding and the
# image size), two text encoders (CLIP ViT-L and OpenCLIP bigG with a projection), a 1024x1024 VAE.
_SDXL_TINY_UNET: dict[str, Any] = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    cross_attention_dim=64,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + the pooled 32
    norm_num_groups=32,
)
_SDXL_TINY_CLIP2: dict[str, Any] = _TINY_CLIP | dict(hidden_act="gelu", projection_dim=32)
_SDXL_FULL_UNET: dict[str, Any] = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
_SDXL_FULL_CLIP2: dict[str, Any] = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    vocab_size=49408,
    projection_dim=1280,
)
_SDXL_VAE: dict[str, Any] = dict(scaling_factor=0.13025, force_upcast=True)
_TINY = {
    "sdxl": (_SDXL_TINY_UNET, _TINY_VAE | _SDXL_VAE, _TINY_CLIP),
    "sd1": (_TINY_UNET, _TINY_VAE, _TINY_CLIP),
    "sd2": (_TINY_UNET | _SD2_TINY_UNET, _TINY_VAE, _TINY_CLIP | _SD2_TINY_CLIP),
}
_FULL = {
    "sd1": (_FULL_UNET, _FULL_VAE, _FULL_CLIP),
    "sd2": (_FULL_UNET | _SD2_FULL_UNET, _FULL_VAE | {"sample_size": 768}, _FULL_CLIP | _SD2_FULL_CLIP),
    "sdxl": (_SDXL_FULL_UNET, _FULL_VAE | _SDXL_VAE | {"sample_size": 1024}, _FULL_CLIP),
}
_CLIP2 = {"tiny": _SDXL_TINY_CLIP2, "full": _SDXL_FULL_CLIP2}
_SUBFOLDERS = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "tokenizer": None,
    "scheduler": None,
}


@dataclass
class Networks:
    clip: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict[str, Any]
    tokenizer_dir: Path | None
    variant: Variant = VARIANTS["sd1.5"]
    # SDXL's second text encoder (OpenCLIP bigG with its projection) and its tokenizer folder
    clip2: CLIPTextModelWithProjection | None = None
    tokenizer2_dir: Path | None = None
    force_zeros_for_empty_prompt: bool = True  # SDXL pipelines' config (model_index.json)

    @property
    def latent_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


MAX_SAMPLE_SIZE = 256  # latents of 2048x2048 images: past that a build asks for terabytes


def _read_config(path: Path) -> dict[str, Any]:
    """A JSON config file of a model folder, or one line saying which file is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MlcwebError(f"{path} is not a readable JSON config ({err}); fix or re-download the model folder") from err
    if not isinstance(data, dict):
        raise MlcwebError(f"{path} is not a JSON object; fix or re-download the model folder")
    return data


def check_sample_size(size: object, where: str) -> int:
    """A latent height and width the UNet can be built for: a whole multiple of 8 from 8 to 256."""
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= MAX_SAMPLE_SIZE or size % 8:
        raise MlcwebError(
            f"{where} is {size!r}; the latent size must be a multiple of 8 from 8 to {MAX_SAMPLE_SIZE} "
            "(64 for SD1.5's 512x512 images)"
        )
    return size


def _check_folder(path: Path) -> Variant:
    """The folder's variant, after checking it holds the networks a Stable Diffusion build reads."""
    if not path.is_dir():
        raise MlcwebError(f"model folder {path} does not exist; pass --model with a diffusers Stable Diffusion folder")
    missing = [sub for sub in _SUBFOLDERS if not (path / sub).is_dir()]
    if missing:
        raise MlcwebError(
            f"{path} is not a diffusers Stable Diffusion folder: missing {', '.join(f'{m}/' for m in missing)} "
            "(expected unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    configs: dict[str, dict[str, Any]] = {}
    for sub, cls in _SUBFOLDERS.items():
        if cls is None:
            continue
        config = path / sub / "config.json"
        if not config.is_file():
            raise MlcwebError(f"{path / sub} has no config.json")
        data = configs[sub] = _read_config(config)
        found = data.get("_class_name") or (data.get("architectures") or [None])[0]
        if found != cls:
            raise MlcwebError(f"{path / sub} holds a {found}, not the {cls} Stable Diffusion needs")
    check_sample_size(configs["unet"].get("sample_size"), f"{path / 'unet'} sample_size")
    check_tokenizer_folder(path / "tokenizer")
    sched = path / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        raise MlcwebError(f"{path / 'scheduler'} has no scheduler_config.json")
    index = path / "model_index.json"
    found = detect(
        _read_config(index) if index.is_file() else None,
        configs["unet"],
        configs["text_encoder"],
        _read_config(sched),
        str(path),
    )
    if found.architecture == "sdxl":
        for sub in ("text_encoder_2", "tokenizer_2"):
            if not (path / sub).is_dir():
                raise MlcwebError(f"{path} is an SDXL folder without {sub}/; re-download the model folder")
        config = path / "text_encoder_2" / "config.json"
        if not config.is_file():
            raise MlcwebError(f"{path / 'text_encoder_2'} has no config.json")
        cls = (_read_config(config).get("architectures") or [None])[0]
        if cls != "CLIPTextModelWithProjection":
            raise MlcwebError(
                f"{path / 'text_encoder_2'} holds a {cls}, not the CLIPTextModelWithProjection SDXL needs"
            )
        check_tokenizer_folder(path / "tokenizer_2")
    return found


def load_networks(
    size: str = "tiny", model_path: Path | None = None, seed: int = 0, variant: str = "sd1.5"
) -> Networks:
    """The three networks in float32 eval mode, from ``model_path`` (its variant detected) or built from
    the configs of ``variant`` at ``size`` (seeded random weights)."""
    if model_path is not None:
        found = _check_folder(model_path)
        clip = CLIPTextModel.from_pretrained(model_path / "text_encoder", attn_implementation="eager")
        unet = UNet2DConditionModel.from_pretrained(model_path / "unet")
        vae = AutoencoderKL.from_pretrained(model_path / "vae")
        nets = Networks(clip, unet, vae, found.scheduler_config, model_path / "tokenizer", found)
        if found.architecture == "sdxl":
            nets.clip2 = CLIPTextModelWithProjection.from_pretrained(
                model_path / "text_encoder_2", attn_implementation="eager"
            )
            nets.tokenizer2_dir = model_path / "tokenizer_2"
            index = model_path / "model_index.json"
            if index.is_file():
                nets.force_zeros_for_empty_prompt = bool(_read_config(index).get("force_zeros_for_empty_prompt", True))
    elif size in ("tiny", "full"):
        chosen = variant_named(variant)
        torch.manual_seed(seed)
        unet_cfg, vae_cfg, clip_cfg = (_TINY if size == "tiny" else _FULL)[chosen.architecture]
        clip = CLIPTextModel(CLIPTextConfig(**clip_cfg, attn_implementation="eager"))
        unet_cfg = unet_cfg | chosen.unet_config
        if size == "full" and chosen.full_sample_size:
            unet_cfg["sample_size"] = chosen.full_sample_size
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        nets = Networks(clip, unet, vae, dict(chosen.scheduler_config), None, chosen)
        if chosen.architecture == "sdxl":
            nets.clip2 = CLIPTextModelWithProjection(CLIPTextConfig(**_CLIP2[size], attn_implementation="eager"))
    else:
        raise MlcwebError(f"unknown size {size!r}: use 'tiny' or 'full', or pass --model PATH")
    for net in (nets.clip, nets.unet, nets.vae, nets.clip2):
        if net is not None:
            net.eval().float()
    return nets


class CLIPStage(torch.nn.Module):
    """int32 token ids (1, 77) -> text embeddings (1, 77, hidden)."""

    def __init__(self, clip: CLIPTextModel) -> None:
        super().__init__()
        self.clip = clip
        # WebGPU has no 64-bit integers: keep the position ids buffer in int32.
        emb = getattr(clip, "text_model", clip).embeddings
        emb.register_buffer("position_ids", emb.position_ids.to(torch.int32), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.clip(input_ids=input_ids)[0]


class SDXLTextStage(torch.nn.Module):
    """SDXL's two text encoders: int32 ids (1, 77) for each tokenizer -> the penultimate hidden states of
    both, concatenated (1, 77, 768 + 1280), and the second encoder's projected pooled output (1, 1280)."""

    def __init__(self, clip: CLIPTextModel, clip2: CLIPTextModelWithProjection) -> None:
        super().__init__()
        self.first, self.second = CLIPStage(clip), CLIPStage(clip2)

    def forward(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        one = self.first.clip(input_ids=input_ids, output_hidden_states=True)
        two = self.second.clip(input_ids=input_ids_2, output_hidden_states=True)
        embeds = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
        return embeds, two.text_embeds


def sdxl_time_ids(image_size: int) -> torch.Tensor:
    """SDXL's added time ids for a square image at its own size, uncropped: original size, crop top-left,
    target size (diffusers' defaults)."""
    return torch.tensor([[image_size, image_size, 0, 0, image_size, image_size]], dtype=torch.float32)


class SDXLUNetStage(torch.nn.Module):
    """SDXL's UNet with classifier-free guidance: ``pooled`` (2, 1280) is the pooled text embedding of the
    negative and the positive prompt; the time ids are fixed by the image size the build is for."""

    def __init__(self, unet: UNet2DConditionModel, image_size: int) -> None:
        super().__init__()
        self.unet = unet
        self.time_ids: torch.Tensor
        self.register_buffer("time_ids", sdxl_time_ids(image_size), persistent=False)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        embeddings: torch.Tensor,
        pooled: torch.Tensor,
        guidance: torch.Tensor,
    ) -> torch.Tensor:
        doubled = torch.cat([latents, latents], dim=0)
        added = {"text_embeds": pooled, "time_ids": self.time_ids.repeat(2, 1)}
        noise = self.unet(doubled, timestep, encoder_hidden_states=embeddings, added_cond_kwargs=added).sample
        uncond, cond = noise.chunk(2)
        return uncond + guidance * (cond - uncond)


class SDXLSingleUNetStage(SDXLUNetStage):
    """SDXL's UNet on a batch of one, without guidance (SDXL-Turbo, scales of 1 or less)."""

    def forward(  # type: ignore[override]
        self, latents: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        added = {"text_embeds": pooled, "time_ids": self.time_ids}
        return self.unet(latents, timestep, encoder_hidden_states=embeddings, added_cond_kwargs=added).sample


class UNetStage(torch.nn.Module):
    """Classifier-free guidance around the UNet: latents doubled, noise prediction split and mixed."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor, guidance: torch.Tensor
    ) -> torch.Tensor:
        doubled = torch.cat([latents, latents], dim=0)
        noise = self.unet(doubled, timestep, encoder_hidden_states=embeddings).sample
        uncond, cond = noise.chunk(2)
        return uncond + guidance * (cond - uncond)


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's embedding of ``w = guidance - 1`` (a vector), as diffusers' pipelines compute it."""
    w = w * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


class SingleUNetStage(torch.nn.Module):
    """The UNet on a batch of one, without classifier-free guidance: guidance-free models (SD-Turbo) and
    guidance scales of 1 or less (diffusers skips CFG there)."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self.unet(latents, timestep, encoder_hidden_states=embeddings).sample


class EmbeddedGuidanceUNetStage(SingleUNetStage):
    """LCM: the batch-one UNet whose guidance scale enters as an embedding (``time_cond_proj_dim``)."""

    def forward(  # type: ignore[override]
        self, latents: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor, guidance: torch.Tensor
    ) -> torch.Tensor:
        cond = guidance_scale_embedding(guidance.reshape(1) - 1.0, int(self.unet.config.time_cond_proj_dim))
        return self.unet(latents, timestep, encoder_hidden_states=embeddings, timestep_cond=cond).sample


class VAEStage(torch.nn.Module):
    """Latents -> RGBA image (H, W, 4): 1/scaling_factor, decode, [-1, 1] -> [0, 255].

    The values are whole numbers 0..255 (alpha 255) held in float32, not uint8: WGSL has no 8-bit
    types, so a uint8 output buffer cannot exist on WebGPU. Hosts convert with ``astype(uint8)``
    (exact) or ``Uint8ClampedArray``.
    """

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        image = self.decoder(self.post_quant_conv(latents / self.scaling_factor))
        image = (image / 2 + 0.5).clamp(0, 1)
        rgb = (image[0].permute(1, 2, 0) * 255).round()
        alpha = torch.full_like(rgb[:, :, :1], 255.0)
        return torch.cat([rgb, alpha], dim=-1)


class VAEEncodeStage(torch.nn.Module):
    """RGB image (H, W, 3), values 0..255, and a standard normal (1, 4, h, w) -> the latents image-to-image
    starts from: the encoder's Gaussian sampled with that noise (``latent_dist.sample``), times the
    scaling factor, as diffusers' img2img pipelines prepare them."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, image: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x = (image / 255.0 * 2.0 - 1.0).permute(2, 0, 1)[None]
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return (mean + std * noise) * self.scaling_factor

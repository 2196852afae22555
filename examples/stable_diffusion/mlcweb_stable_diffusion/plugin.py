"""The mlcweb plugin: declares ``stable-diffusion`` and imports it into one Relax module.

Functions of the module (each a Relax function; weights are the trailing arguments):

- ``clip(input_ids: int32[1, 77]) -> float32[1, 77, d]``
- ``concat_embeddings(uncond, cond) -> float32[2, 77, d]`` (unconditional first, as the UNet expects)
- ``unet(latents[1, 4, h, w], timestep: int32[], embeddings[2, 77, d], guidance: float32[]) -> eps``:
  classifier-free guidance inside (models that use it)
- ``unet_single(latents, timestep, embeddings[1, 77, d]) -> eps``: one batch, no guidance (guidance-free
  models such as SD-Turbo); LCM's takes ``guidance: float32[]`` as a fourth input (an embedding)
- ``dpm_solver_step``, ``pndm_step`` and ``ancestral_step`` (see :mod:`.schedulers`)
- ``vae(latents) -> float32[H, W, 4]`` (RGBA, whole numbers 0..255; WGSL has no uint8)
- ``vae_encode(image: float32[H, W, 3], noise: float32[1, 4, h, w]) -> latents``: image-to-image's start

Which UNet functions a build has, and its defaults, come from the model's variant (:mod:`.variants`).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import tvm
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

import mlcweb_passes as mp
from mlcweb import BuildOptions, ImportedModel, ImportOptions, ModelSpec, hookimpl
from mlcweb.errors import MlcwebError
from mlcweb.model import PhaseContext

from . import MODEL_NAME
from .lora import fuse_loras, parse_lora
from .models import (
    CLIPStage,
    EmbeddedGuidanceUNetStage,
    Networks,
    SDXLSingleUNetStage,
    SDXLTextStage,
    SDXLUNetStage,
    SingleUNetStage,
    UNetStage,
    VAEEncodeStage,
    VAEStage,
    check_sample_size,
    load_networks,
)
from .schedulers import SCHEDULERS, step_functions
from .tokenizer import (
    END_OF_TEXT,
    MAX_LENGTH,
    copy_tokenizer_files,
    folder_pad_token,
    pad_token_id,
    write_clip_vocab,
    write_tokenizer_json,
)

DEFAULT_CONFIG: dict[str, Any] = {
    "size": "tiny",
    # which member of the family random weights are built as (--model folders are detected instead)
    "variant": "sd1.5",
    "seed": 0,
    # Latent height and width (the image is 8x that); 0 keeps the model's own (64 for SD1.5: 512x512).
    "latent_size": 0,
    # scheduler constants to write, {"dpm": [20, 10], ...}; null: the variant's
    "steps": None,
    # LoRA files fused into the UNet and text encoders: ["FILE", "FILE:SCALE", ...]
    "lora": [],
}
STAGES = (
    "clip",
    "concat_embeddings",
    "unet",
    "unet_single",
    "dpm_solver_step",
    "pndm_step",
    "ancestral_step",
    "vae",
    "vae_encode",
)


def _export(stage: torch.nn.Module, args: tuple[torch.Tensor, ...], name: str) -> tuple[tvm.IRModule, Any]:
    with torch.no_grad():
        exported = torch.export.export(stage.eval(), args)
    mod = from_exported_program(exported, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    mod, params = mp.detach_params(mod)
    func = mod["main"].with_attr("global_symbol", name)
    return tvm.IRModule({name: func}), params


def _concat_function(hidden: int, pooled: int = 0) -> relax.Function:
    """``(uncond, cond) -> [2, 77, hidden]``; for SDXL also the pooled embeddings, returning both."""
    ty = relax.TensorType((1, MAX_LENGTH, hidden), "float32")
    params = [relax.Var("uncond", ty), relax.Var("cond", ty)]
    if pooled:
        pty = relax.TensorType((1, pooled), "float32")
        params += [relax.Var("uncond_pooled", pty), relax.Var("cond_pooled", pty)]
    bb = relax.BlockBuilder()
    with bb.function("concat_embeddings", params, attrs={"num_input": len(params)}):
        with bb.dataflow():
            outs = [relax.op.concat(params[i : i + 2], axis=0) for i in range(0, len(params), 2)]
            out = bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()["concat_embeddings"]


def _text_function(nets: Networks) -> tuple[tvm.IRModule, Any]:
    ids = torch.zeros(1, MAX_LENGTH, dtype=torch.int32)
    if nets.clip2 is None:
        return _export(CLIPStage(nets.clip), (ids,), "clip")
    return _export(SDXLTextStage(nets.clip, nets.clip2), (ids, ids.clone()), "clip")


def _unet_functions(nets: Networks, latents: torch.Tensor, hidden: int, pooled: int) -> list[tuple[tvm.IRModule, Any]]:
    step = torch.tensor(1, dtype=torch.int32)
    image = int(latents.shape[-1]) * nets.vae_scale
    out = []
    for name in nets.variant.unets:
        batch = 2 if name == "unet" else 1
        args: tuple[torch.Tensor, ...] = (latents, step, torch.zeros(batch, MAX_LENGTH, hidden))
        stage: torch.nn.Module
        if pooled:  # SDXL: the pooled text embedding too
            args += (torch.zeros(batch, pooled),)
            stage = SDXLUNetStage(nets.unet, image) if batch == 2 else SDXLSingleUNetStage(nets.unet, image)
        else:
            stage = UNetStage(nets.unet) if batch == 2 else SingleUNetStage(nets.unet)
        if batch == 2:
            args += (torch.tensor(7.5),)
        elif nets.variant.guidance_embedding:
            args += (torch.tensor(8.0),)
            stage = EmbeddedGuidanceUNetStage(nets.unet)
        out.append(_export(stage, args, name))
    return out


def check_steps(steps: object, train_steps: int) -> dict[str, list[int]]:
    """``--set steps=...``: scheduler name -> step counts whose constants the build writes."""
    ok = (
        isinstance(steps, dict)
        and steps
        and all(
            name in SCHEDULERS
            and isinstance(counts, list)
            and counts
            and all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= train_steps // 2 for n in counts)
            for name, counts in steps.items()
        )
    )
    if not ok or not isinstance(steps, dict):
        raise MlcwebError(
            f"--set steps={json.dumps(steps)} is not a map from a scheduler ({', '.join(SCHEDULERS)}) to step "
            f'counts from 1 to {train_steps // 2}, like {{"dpm": [20, 10]}}'
        )
    return {str(name): list(counts) for name, counts in steps.items()}


def import_networks(nets: Networks, latent_size: int = 0, steps: dict[str, list[int]] | None = None) -> ImportedModel:
    """Export the networks and add the Relax-only functions; one module, weights per function.

    ``latent_size`` (> 0) compiles for that latent height and width instead of the UNet's ``sample_size``.
    The UNet functions share their weights (the build stores identical weights once).
    """
    hidden = int(nets.clip.config.hidden_size)
    pooled = 0
    if nets.clip2 is not None:  # SDXL: both encoders' hidden states side by side, the second's pooled
        hidden += int(nets.clip2.config.hidden_size)
        pooled = int(nets.clip2.config.projection_dim)
    size = check_sample_size(latent_size, "--set latent_size") if latent_size else nets.latent_size
    latents = torch.zeros(1, 4, size, size)
    clip_mod, clip_params = _text_function(nets)
    unets = _unet_functions(nets, latents, hidden, pooled)
    vae_mod, vae_params = _export(VAEStage(nets.vae), (latents,), "vae")
    image = size * nets.vae_scale
    encode_mod, encode_params = _export(
        VAEEncodeStage(nets.vae), (torch.zeros(image, image, 3), torch.zeros(latents.shape)), "vae_encode"
    )
    if nets.vae.config.get("force_upcast") and nets.clip2 is not None:
        # SDXL's VAE overflows float16 (diffusers upcasts it): it stays float32 in float16 builds
        vae_mod = tvm.IRModule({"vae": vae_mod["vae"].with_attr(mp.KEEP_FLOAT32_ATTR, True)})
        encode_mod = tvm.IRModule({"vae_encode": encode_mod["vae_encode"].with_attr(mp.KEEP_FLOAT32_ATTR, True)})
    extra = {}
    if "unet" in nets.variant.unets:
        extra["concat_embeddings"] = _concat_function(hidden, pooled)
    for cls in step_functions().values():
        extra[cls.function] = cls(nets.scheduler_config).step_function(tuple(latents.shape))
    names = ["clip", *nets.variant.unets, "vae", "vae_encode", "relax"]
    mod = mp.merge_modules(clip_mod, *(m for m, _ in unets), vae_mod, encode_mod, tvm.IRModule(extra), names=names)
    variant = nets.variant
    metadata = {
        "variant": variant.name,
        "architecture": variant.architecture,
        "prediction_type": variant.prediction_type,
        "defaults": variant.defaults(),
        "guidance_embedding": variant.guidance_embedding,
        "latent_shape": [1, 4, size, size],
        "image_shape": [image, image, 4],
        "hidden_size": hidden,
        "max_length": MAX_LENGTH,
        "scheduler_config": nets.scheduler_config,
        "vae_scaling_factor": float(nets.vae.config.scaling_factor),
    }
    train_steps = int(nets.scheduler_config.get("num_train_timesteps", 1000))
    metadata["schedules"] = check_steps(steps if steps is not None else variant.steps, train_steps)
    pad = folder_pad_token(nets.tokenizer_dir) if nets.tokenizer_dir is not None else variant.pad_token
    metadata["pad_token"] = pad
    metadata["pad_token_id"] = pad_token_id(pad, nets.tokenizer_dir)
    ranges = {"clip": {"input_ids": (0, int(nets.clip.config.vocab_size) - 1)}}
    if nets.clip2 is not None:
        pad2 = folder_pad_token(nets.tokenizer2_dir) if nets.tokenizer2_dir is not None else "!"
        metadata["pooled_size"] = pooled
        metadata["pad_token_2"] = pad2
        metadata["pad_token_id_2"] = pad_token_id(pad2, nets.tokenizer2_dir)
        # diffusers' SDXL pipelines use zeros, not the empty prompt's embeddings, for no negative prompt
        metadata["force_zeros_for_empty_prompt"] = nets.force_zeros_for_empty_prompt
        ranges["clip"]["input_ids_2"] = (0, int(nets.clip2.config.vocab_size) - 1)
    ranges.update({name: {"timestep": (0, train_steps - 1)} for name in variant.unets})
    params = {"clip": clip_params, "vae": vae_params, "vae_encode": encode_params}
    params.update({name: p for name, (_, p) in zip(variant.unets, unets, strict=True)})
    return ImportedModel(mod=mod, params=params, metadata=metadata, input_ranges=ranges)


@hookimpl
def mlcweb_models() -> list[ModelSpec]:
    return [
        ModelSpec(
            MODEL_NAME,
            "Stable Diffusion 1.x / 2.x, SD-Turbo, LCM (tiny random SD1.5 weights by default; --model for a "
            "diffusers folder, --set variant=sd2.1|sd-turbo|lcm, --set size=full for the full-size architecture)",
            STAGES,
            dict(DEFAULT_CONFIG),
            # One image with the default 20-step DPM-Solver++: CLIP for the prompt and the negative prompt,
            # the guided UNet and the scheduler step once per step, the VAE once. PNDM's step function is
            # not used then; tune it with --tasks.
            runs_per_use={
                "clip": 2,
                "concat_embeddings": 1,
                "unet": 20,
                "unet_single": 4,
                "dpm_solver_step": 20,
                "pndm_step": 0,
                "ancestral_step": 4,
                "vae": 1,
                "vae_encode": 0,
            },
            file_options=("lora",),
        )
    ]


@hookimpl
def mlcweb_import_model(spec: ModelSpec, options: ImportOptions) -> ImportedModel:
    config = {**spec.default_config, **options.config}
    loras = config["lora"]
    if not isinstance(loras, list):
        raise MlcwebError(f"--set lora={loras!r} is not a list of FILE or FILE:SCALE")
    specs = [parse_lora(x) for x in loras]  # before minutes of loading
    nets = load_networks(config["size"], options.model_path, config["seed"], config["variant"])
    fuse_loras(nets, specs)
    latent = config["latent_size"]
    if not isinstance(latent, int) or isinstance(latent, bool):
        raise MlcwebError(f"--set latent_size={latent!r} is not a whole number; pass 0 for the model's own size")
    imported = import_networks(nets, latent, config["steps"])
    imported.metadata["lora"] = [{"file": s.path.name, "scale": s.scale, "sha256": s.sha256()} for s in specs]
    return imported


@hookimpl
def mlcweb_phase_passes(spec: ModelSpec, phase: str, context: PhaseContext) -> list[tvm.transform.Pass]:
    """SD's own rewrites, before weight lifting, where convolutions are channels last (NHWC):

    - float16 builds: float16 between GEMM epilogues and norms, shortcut branches and upsampler inputs
      (measured with these layouts, on cuda); the norms' float16 scale and shift are stored;
    - on Hopper (wgmma GEMMs): GEGLU's value and gate columns interleaved, so the projection's epilogue
      computes ``a * gelu(g)``;
    - on Hopper and on WebGPU (both dtypes): each attention's projections of one input merged into one
      GEMM that flash attention reads in place (the 154-row text K/V projections are 32 GEMMs a step
      otherwise, each too short to fill the GPU).
    """
    if phase != "weights" or mp.conv_layout(context.target, context.pipeline) != "NHWC":
        return []
    passes: list[tvm.transform.Pass] = []
    float16 = context.pipeline.dtype == "float16"
    if float16:
        passes += [mp.Float16NormInputs(), mp.Float16Residuals()]
    wgmma = float16 and context.pipeline.wgmma and mp.supports_wgmma(context.target)
    if wgmma:
        passes.append(mp.GegluPairs())
    if wgmma or (context.target.kind.name == "webgpu" and context.pipeline.flash_attention):
        passes.append(mp.MergeProjections())
    return passes


def write_scheduler_constants(
    out_dir: Path, scheduler_config: dict[str, Any], steps: dict[str, list[int]]
) -> list[str]:
    written = []
    for name, counts in sorted(steps.items()):
        sched = SCHEDULERS[name](scheduler_config)
        for n in counts:
            rel = f"scheduler-{name}-{n}.json"
            (out_dir / rel).write_text(json.dumps(sched.constants(n), indent=1) + "\n")
            written.append(rel)
    return written


@hookimpl
def mlcweb_write_assets(
    spec: ModelSpec, out_dir: Path, target: tvm.target.Target, options: BuildOptions, imported: ImportedModel
) -> list[str]:
    folders = ["tokenizer", "tokenizer_2"] if "pad_token_2" in imported.metadata else ["tokenizer"]
    written = []
    for sub in folders:
        if options.model_path is not None:
            copy_tokenizer_files(options.model_path / sub, out_dir / sub)
        else:
            write_clip_vocab(out_dir / sub)
        written += [f"{sub}/vocab.json", f"{sub}/merges.txt"]
    written += write_scheduler_constants(out_dir, imported.metadata["scheduler_config"], imported.metadata["schedules"])
    if target.kind.name == "webgpu":
        written += write_web_page(out_dir, imported.metadata)
    return written


def write_web_page(out_dir: Path, metadata: dict[str, Any]) -> list[str]:
    """The browser page (this package's ``static/``) and the tokenizer.json its JS tokenizer reads (one
    per tokenizer: SDXL has two, padding differently)."""
    write_tokenizer_json(out_dir / "tokenizer", metadata.get("pad_token", END_OF_TEXT))
    written = ["tokenizer/tokenizer.json"]
    if "pad_token_2" in metadata:
        write_tokenizer_json(out_dir / "tokenizer_2", metadata["pad_token_2"])
        written.append("tokenizer_2/tokenizer.json")
    static = resources.files(__package__).joinpath("static")
    for src in sorted(static.iterdir(), key=lambda f: f.name):
        if src.is_file():
            (out_dir / src.name).write_bytes(src.read_bytes())
            written.append(src.name)
    return written

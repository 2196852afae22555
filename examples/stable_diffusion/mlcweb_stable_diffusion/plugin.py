"""The mlcweb plugin: declares ``stable-diffusion`` and imports it into one Relax module.

Functions of the module (each a Relax function; weights are the trailing arguments):

- ``clip(input_ids: int32[1, 77]) -> float32[1, 77, d]``
- ``concat_embeddings(uncond, cond) -> float32[2, 77, d]`` (unconditional first, as the UNet expects)
- ``unet(latents[1, 4, h, w], timestep: int32[], embeddings[2, 77, d], guidance: float32[]) -> eps``
- ``dpm_solver_step`` and ``pndm_step`` (see :mod:`.schedulers`)
- ``vae(latents) -> float32[H, W, 4]`` (RGBA, whole numbers 0..255; WGSL has no uint8)
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
from .models import CLIPStage, Networks, UNetStage, VAEStage, check_sample_size, load_networks
from .schedulers import SCHEDULERS
from .tokenizer import MAX_LENGTH, write_clip_vocab, write_tokenizer_json

DEFAULT_CONFIG: dict[str, Any] = {
    "size": "tiny",
    "seed": 0,
    # Latent height and width (the image is 8x that); 0 keeps the model's own (64 for SD1.5: 512x512).
    "latent_size": 0,
    "guidance": 7.5,
    "steps": {"dpm": [20, 10], "pndm": [50, 20]},
}
STAGES = ("clip", "concat_embeddings", "unet", "dpm_solver_step", "pndm_step", "vae")


def _export(stage: torch.nn.Module, args: tuple[torch.Tensor, ...], name: str) -> tuple[tvm.IRModule, Any]:
    with torch.no_grad():
        exported = torch.export.export(stage.eval(), args)
    mod = from_exported_program(exported, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    mod, params = mp.detach_params(mod)
    func = mod["main"].with_attr("global_symbol", name)
    return tvm.IRModule({name: func}), params


def _concat_function(hidden: int) -> relax.Function:
    ty = relax.TensorType((1, MAX_LENGTH, hidden), "float32")
    uncond, cond = relax.Var("uncond", ty), relax.Var("cond", ty)
    bb = relax.BlockBuilder()
    with bb.function("concat_embeddings", [uncond, cond], attrs={"num_input": 2}):
        with bb.dataflow():
            out = bb.emit_output(relax.op.concat([uncond, cond], axis=0))
        bb.emit_func_output(out)
    return bb.get()["concat_embeddings"]


def import_networks(nets: Networks, latent_size: int = 0) -> ImportedModel:
    """Export the three networks and add the Relax-only functions; one module, weights per function.

    ``latent_size`` (> 0) compiles for that latent height and width instead of the UNet's ``sample_size``.
    """
    hidden = int(nets.clip.config.hidden_size)
    size = check_sample_size(latent_size, "--set latent_size") if latent_size else nets.latent_size
    latents = torch.zeros(1, 4, size, size)
    ids = torch.zeros(1, MAX_LENGTH, dtype=torch.int32)
    clip_mod, clip_params = _export(CLIPStage(nets.clip), (ids,), "clip")
    unet_args = (latents, torch.tensor(1, dtype=torch.int32), torch.zeros(2, MAX_LENGTH, hidden), torch.tensor(7.5))
    unet_mod, unet_params = _export(UNetStage(nets.unet), unet_args, "unet")
    vae_mod, vae_params = _export(VAEStage(nets.vae), (latents,), "vae")
    extra = {"concat_embeddings": _concat_function(hidden)}
    for cls in SCHEDULERS.values():
        sched = cls(nets.scheduler_config)
        extra[sched.function] = sched.step_function(tuple(latents.shape))
    mod = mp.merge_modules(clip_mod, unet_mod, vae_mod, tvm.IRModule(extra), names=["clip", "unet", "vae", "relax"])
    image = size * nets.vae_scale
    metadata = {
        "latent_shape": [1, 4, size, size],
        "image_shape": [image, image, 4],
        "hidden_size": hidden,
        "max_length": MAX_LENGTH,
        "scheduler_config": nets.scheduler_config,
        "vae_scaling_factor": float(nets.vae.config.scaling_factor),
    }
    train_steps = int(nets.scheduler_config.get("num_train_timesteps", 1000))
    ranges = {
        "clip": {"input_ids": (0, int(nets.clip.config.vocab_size) - 1)},
        "unet": {"timestep": (0, train_steps - 1)},
    }
    return ImportedModel(
        mod=mod,
        params={"clip": clip_params, "unet": unet_params, "vae": vae_params},
        metadata=metadata,
        input_ranges=ranges,
    )


@hookimpl
def mlcweb_models() -> list[ModelSpec]:
    return [
        ModelSpec(
            MODEL_NAME,
            "Stable Diffusion v1.5 (tiny random weights by default; --model for a diffusers folder, "
            "--set size=full for the full-size architecture)",
            STAGES,
            dict(DEFAULT_CONFIG),
            # One image with the default 20-step DPM-Solver++: CLIP for the prompt and the negative prompt,
            # the guided UNet and the scheduler step once per step, the VAE once. PNDM's step function is
            # not used then; tune it with --tasks.
            runs_per_use={
                "clip": 2,
                "concat_embeddings": 1,
                "unet": 20,
                "dpm_solver_step": 20,
                "pndm_step": 0,
                "vae": 1,
            },
        )
    ]


@hookimpl
def mlcweb_import_model(spec: ModelSpec, options: ImportOptions) -> ImportedModel:
    config = {**spec.default_config, **options.config}
    nets = load_networks(config["size"], options.model_path, config["seed"])
    latent = config["latent_size"]
    if not isinstance(latent, int) or isinstance(latent, bool):
        raise MlcwebError(f"--set latent_size={latent!r} is not a whole number; pass 0 for the model's own size")
    return import_networks(nets, latent)


@hookimpl
def mlcweb_phase_passes(spec: ModelSpec, phase: str, context: PhaseContext) -> list[tvm.transform.Pass]:
    """SD's own rewrites, before weight lifting, where the build uses tensor-core layouts (NHWC):

    - float16 between GEMM epilogues and norms, shortcut branches and upsampler inputs (measured with
      these layouts, on cuda); the norms' float16 scale and shift are stored;
    - on Hopper (wgmma GEMMs): GEGLU's value and gate columns interleaved, so the projection's epilogue
      computes ``a * gelu(g)``, and each attention's projections of one input merged into one GEMM that
      flash attention reads in place.
    """
    if phase != "weights" or mp.conv_layout(context.target, context.pipeline) != "NHWC":
        return []
    passes: list[tvm.transform.Pass] = [mp.Float16NormInputs(), mp.Float16Residuals()]
    if context.pipeline.wgmma and mp.supports_wgmma(context.target):
        passes += [mp.GegluPairs(), mp.MergeProjections()]
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
    config = {**spec.default_config, **options.config}
    tokenizer_dir = out_dir / "tokenizer"
    if options.model_path is not None:
        tokenizer_dir.mkdir()
        for name in ("vocab.json", "merges.txt"):
            (tokenizer_dir / name).write_bytes((options.model_path / "tokenizer" / name).read_bytes())
    else:
        write_clip_vocab(tokenizer_dir)
    written = ["tokenizer/vocab.json", "tokenizer/merges.txt"]
    written += write_scheduler_constants(out_dir, imported.metadata["scheduler_config"], config["steps"])
    if target.kind.name == "webgpu":
        written += write_web_page(out_dir)
    return written


def write_web_page(out_dir: Path) -> list[str]:
    """The browser page (this package's ``static/``) and the tokenizer.json its JS tokenizer reads."""
    write_tokenizer_json(out_dir / "tokenizer")
    written = ["tokenizer/tokenizer.json"]
    static = resources.files(__package__).joinpath("static")
    for src in sorted(static.iterdir(), key=lambda f: f.name):
        if src.is_file():
            (out_dir / src.name).write_bytes(src.read_bytes())
            written.append(src.name)
    return written

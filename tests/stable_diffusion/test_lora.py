"""--lora: LoRA weights fused at build time against the same LoRA run unfused by PEFT's LoRA layers (what
diffusers' load_lora_weights injects; diffusers 0.42 itself needs PEFT >= 0.22, which the package index
here lacks, so the layers are injected with PEFT directly), in StableDiffusionPipeline on the tiny SD1.5;
final image within 1 of 255 (measured: identical)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mlcweb_stable_diffusion.models import Networks, load_networks
from mlcweb_stable_diffusion.runner import StableDiffusion
from testutil import build_tiny_sd, sd_pipeline

from mlcweb.errors import MlcwebError
from mlcweb.runtime import load

PROMPT, NEGATIVE = "a castle in the clouds", "blurry"


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj"]


def inject(nets: Networks, seed: int = 1) -> None:
    """PEFT LoRA layers (rank 4, random non-zero weights) on the UNet's attention and the text encoder."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    for model, targets in ((nets.unet, UNET_TARGETS), (nets.clip, TEXT_TARGETS)):
        config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets)
        inject_adapter_in_model(config, model)
        for layer in model.modules():  # B starts at zero even with init_lora_weights=False for some layers
            if hasattr(layer, "lora_B"):
                torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.2)


def make_lora(out: Path, variant: str = "sd1.5", kohya: bool = False) -> Path:
    """The LoRA of :func:`inject` saved as diffusers saves one (``unet.<module>.lora_A.weight``), or in
    kohya-ss's spelling (``lora_unet_<module_with_underscores>.lora_down.weight`` and ``alpha``)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    nets = load_networks("tiny", None, 0, variant)
    inject(nets)
    tensors = {}
    for prefix, kohya_prefix, model in (("unet.", "lora_unet_", nets.unet), ("text_encoder.", "lora_te_", nets.clip)):
        for key, value in get_peft_model_state_dict(model).items():
            if not kohya:
                tensors[prefix + key] = value.contiguous()
                continue
            stem, kind = key.rsplit(".lora_", 1)
            name = kohya_prefix + stem.replace(".", "_")
            tensors[name + (".lora_down.weight" if kind.startswith("A") else ".lora_up.weight")] = value.contiguous()
            tensors[name + ".alpha"] = torch.tensor(4.0)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("kohya.safetensors" if kohya else "lora.safetensors")
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora(tmp_path_factory.mktemp("lora"))


def test_fused_build_matches_diffusers_with_the_lora_loaded(lora_file: Path, tmp_path: Path) -> None:
    scale = 0.6
    out = build_tiny_sd(tmp_path / "llvm", "llvm", "float32", config={"lora": [f"{lora_file}:{scale}"]})
    sd = StableDiffusion(load(out))
    assert sd.meta["lora"] == [{"file": "lora.safetensors", "scale": scale, "sha256": sd.meta["lora"][0]["sha256"]}]
    nets = load_networks("tiny")
    pipe = sd_pipeline(nets, sd.tokenizer.hf, "dpm")
    args = {"negative_prompt": NEGATIVE, "num_inference_steps": 10, "output_type": "np"}
    with torch.no_grad():
        plain = pipe(PROMPT, generator=torch.Generator().manual_seed(3), **args).images[0]
        inject(nets)
        for layer in [*nets.unet.modules(), *nets.clip.modules()]:
            if hasattr(layer, "scaling"):
                layer.scaling["default"] *= scale
        styled = pipe(PROMPT, generator=torch.Generator().manual_seed(3), **args).images[0]
    expected = (styled * 255).round().astype(np.uint8)
    assert np.abs(expected.astype(int) - (plain * 255).round().astype(int)).max() > 8  # the LoRA matters
    got = sd.generate(PROMPT, NEGATIVE, steps=10, scheduler="dpm", guidance=7.5, seed=3).image
    diff = np.abs(got[..., :3].astype(int) - expected.astype(int))
    assert np.unique(expected).size > 50 and diff.max() <= 1, f"max {diff.max()}, mean {diff.mean():.4f}"


def test_the_kohya_spelling_fuses_the_same_weights(lora_file: Path, tmp_path: Path) -> None:
    from mlcweb_stable_diffusion.lora import fuse_loras, parse_lora

    kohya = make_lora(tmp_path, kohya=True)
    one, two = load_networks("tiny"), load_networks("tiny")
    fuse_loras(one, [parse_lora(f"{lora_file}:0.7")])
    fuse_loras(two, [parse_lora(f"{kohya}:0.7")])
    base = load_networks("tiny")
    changed = 0
    for (name, a), b, c in zip(
        one.unet.state_dict().items(), two.unet.state_dict().values(), base.unet.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
        changed += int(not torch.equal(a, c))
    # q, k, v, out of both attentions in each of the 4 transformer blocks (down 1, mid 1, up 2)
    assert changed == 4 * 2 * 4


def test_a_lora_for_another_architecture_is_one_error_and_changes_nothing(tmp_path: Path) -> None:
    from mlcweb_stable_diffusion.lora import fuse_loras, parse_lora

    other = make_lora(tmp_path, "sdxl")
    nets = load_networks("tiny")
    before = {k: v.clone() for k, v in nets.unet.state_dict().items()}
    with pytest.raises(MlcwebError, match=r"--lora .*lora.safetensors does not fit this model: .* of the (unet|clip)"):
        fuse_loras(nets, [parse_lora(str(other))])
    assert all(torch.equal(before[k], v) for k, v in nets.unet.state_dict().items())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("/no/such/lora.safetensors", "does not exist; pass a LoRA .safetensors file"),
        ("/no/such/lora.safetensors:0.5", "does not exist"),
        ("FILE:99", "the scale must be between -10 and 10"),
        ("", "is not FILE or FILE:SCALE"),
    ],
)
def test_bad_lora_arguments_are_one_line(lora_file: Path, text: str, message: str) -> None:
    from mlcweb_stable_diffusion.lora import parse_lora

    with pytest.raises(MlcwebError, match=message):
        parse_lora(text.replace("FILE", str(lora_file)))

"""Bad --model folders are clear errors naming what is missing or wrong."""

import json
from pathlib import Path

import pytest
from mlcweb_stable_diffusion.models import load_networks

from mlcweb.errors import MlcwebError


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(MlcwebError, match="does not exist; pass --model"):
        load_networks(model_path=tmp_path / "sd15")


def test_folder_missing_subfolders_names_them(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    with pytest.raises(MlcwebError, match=r"missing text_encoder/, tokenizer/, scheduler/"):
        load_networks(model_path=tmp_path)


def test_wrong_model_type_is_named(tmp_path: Path) -> None:
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / sub).mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModel"]}))
    with pytest.raises(MlcwebError, match="holds a UNet2DModel, not the UNet2DConditionModel"):
        load_networks(model_path=tmp_path)


def test_real_folder_round_trip(tmp_path: Path) -> None:
    """A diffusers folder saved from the tiny networks loads back with the same weights."""
    import torch
    from mlcweb_stable_diffusion.tokenizer import write_clip_vocab

    nets = load_networks("tiny")
    nets.unet.save_pretrained(tmp_path / "unet")
    nets.vae.save_pretrained(tmp_path / "vae")
    nets.clip.save_pretrained(tmp_path / "text_encoder")
    write_clip_vocab(tmp_path / "tokenizer")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(nets.scheduler_config))
    loaded = load_networks(model_path=tmp_path)
    for a, b in zip(nets.unet.state_dict().values(), loaded.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert loaded.tokenizer_dir == tmp_path / "tokenizer"


def _folder(root: Path, unet: dict[str, object] | str) -> Path:
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (root / sub).mkdir()
    text = unet if isinstance(unet, str) else json.dumps({"_class_name": "UNet2DConditionModel", **unet})
    (root / "unet" / "config.json").write_text(text)
    (root / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (root / "text_encoder" / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModel"]}))
    return root


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(MlcwebError, match=r"unet/config.json is not a readable JSON config"):
        load_networks(model_path=_folder(tmp_path, "{not json"))


@pytest.mark.parametrize("size", [0, 7, 100_000, "64", None])
def test_sample_sizes_that_cannot_be_built_are_refused_before_loading(tmp_path: Path, size: object) -> None:
    with pytest.raises(MlcwebError, match=r"sample_size is .*multiple of 8 from 8 to 256"):
        load_networks(model_path=_folder(tmp_path, {"sample_size": size}))


@pytest.mark.parametrize("latent", [-8, 12, 4096])
def test_latent_size_option_is_checked(latent: int) -> None:
    from mlcweb_stable_diffusion.plugin import import_networks

    with pytest.raises(MlcwebError, match=r"--set latent_size is .*multiple of 8"):
        import_networks(load_networks("tiny"), latent)

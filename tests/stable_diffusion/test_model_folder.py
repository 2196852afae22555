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


def _save_pipeline(root: Path, variant: str, pad: str = "<|endoftext|>") -> Path:
    """A diffusers folder as save_pretrained writes it, from the tiny networks of ``variant``."""
    from diffusers import LatentConsistencyModelPipeline
    from mlcweb_stable_diffusion.tokenizer import Tokenizer, write_clip_vocab
    from testutil import sd_pipeline

    nets = load_networks("tiny", None, 0, variant)
    write_clip_vocab(root / "vocab")
    tokenizer = Tokenizer(root / "vocab", pad_token=pad).hf
    name = {"sd2.1": "pndm", "sd-turbo": "euler_a", "lcm": "lcm", "sdxl": "euler", "sdxl-turbo": "euler_a"}[variant]
    cls = LatentConsistencyModelPipeline if variant == "lcm" else None
    pipe = sd_pipeline(nets, tokenizer, name, cls, tokenizer_2=Tokenizer(root / "vocab", pad_token="!").hf)
    pipe.save_pretrained(root / variant)
    return root / variant


@pytest.mark.parametrize(
    ("variant", "pad", "expected"),
    [
        ("sd2.1", "!", ("sd2", "v_prediction", ("unet",), "dpm", 20, 7.5, 0)),
        ("sd-turbo", "!", ("sd2", "epsilon", ("unet_single", "unet"), "euler_a", 1, 0.0, 0)),
        ("lcm", "<|endoftext|>", ("sd1", "epsilon", ("unet_single",), "lcm", 4, 8.0, 49407)),
        ("sdxl", "<|endoftext|>", ("sdxl", "epsilon", ("unet",), "euler", 30, 5.0, 49407)),
        ("sdxl-turbo", "<|endoftext|>", ("sdxl", "epsilon", ("unet_single", "unet"), "euler_a", 1, 0.0, 49407)),
    ],
)
def test_the_variant_of_a_folder_is_detected(
    tmp_path: Path, variant: str, pad: str, expected: tuple[object, ...]
) -> None:
    """Architecture, prediction type, UNet functions and defaults from model_index.json and the configs;
    the padding token from the tokenizer's config."""
    from mlcweb_stable_diffusion.plugin import import_networks

    folder = _save_pipeline(tmp_path, variant, pad)
    nets = load_networks(model_path=folder)
    v = nets.variant
    defaults = v.defaults()
    imported = import_networks(nets)
    got = (v.architecture, v.prediction_type, v.unets, defaults["scheduler"], defaults["steps"], defaults["guidance"])
    assert (*got, imported.metadata["pad_token_id"]) == expected
    assert imported.metadata["pad_token"] == pad
    if v.architecture == "sdxl":  # the second tokenizer pads with "!"
        assert (imported.metadata["pad_token_2"], imported.metadata["pad_token_id_2"]) == ("!", 0)
        assert imported.metadata["force_zeros_for_empty_prompt"] is True
    assert {gv.name_hint for gv in imported.mod.get_global_vars()} >= set(v.unets)
    # transformers 5 saves tokenizer.json only: the build writes vocab.json + merges.txt from it
    from mlcweb_stable_diffusion.tokenizer import Tokenizer, copy_tokenizer_files

    copy_tokenizer_files(folder / "tokenizer", tmp_path / "copied")
    ours = Tokenizer(tmp_path / "copied", pad_token=pad)
    theirs = Tokenizer(tmp_path / "vocab", pad_token=pad)
    for prompt in ("a red fox!", "naïve café 2024"):
        assert ours(prompt).tolist() == theirs(prompt).tolist()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"model_index.json": {"_class_name": "StableDiffusionXLPipeline"}}, "names a StableDiffusionXLPipeline, but"),
        ({"model_index.json": {"_class_name": "KandinskyPipeline"}}, "holds a KandinskyPipeline"),
        ({"unet/config.json": {"addition_embed_type": "image"}}, "added embeddings of type 'image'"),
        ({"scheduler/scheduler_config.json": {"prediction_type": "sample"}}, "predicts 'sample'"),
        ({"scheduler/scheduler_config.json": {"_class_name": "KDPM2DiscreteScheduler"}}, "is a KDPM2Discrete"),
    ],
)
def test_a_folder_the_plugin_cannot_build_is_named(
    tmp_path: Path, edit: dict[str, dict[str, str]], message: str
) -> None:
    folder = _save_pipeline(tmp_path, "sd2.1", "!")
    for rel, change in edit.items():
        data = json.loads((folder / rel).read_text())
        (folder / rel).write_text(json.dumps({**data, **change}))
    with pytest.raises(MlcwebError, match=message):
        load_networks(model_path=folder)


def test_an_sdxl_folder_without_its_second_encoder_is_named(tmp_path: Path) -> None:
    import shutil

    folder = _save_pipeline(tmp_path, "sdxl")
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(MlcwebError, match="SDXL folder without text_encoder_2/"):
        load_networks(model_path=folder)

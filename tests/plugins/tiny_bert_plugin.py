"""A second mlcweb plugin, used by the tests: a tiny BERT encoder from transformers, built from a config.

It proves the host API is not shaped around Stable Diffusion: one component, integer inputs, a
transformers model instead of diffusers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertModel
from tvm.relax.frontend.torch import from_exported_program

import mlcweb_passes as mp
from mlcweb import ImportedModel, ImportOptions, ModelSpec, hookimpl
from mlcweb.errors import MlcwebError

DEFAULT_CONFIG: dict[str, Any] = {"seq_len": 16, "hidden_size": 32, "layers": 2, "heads": 4, "vocab": 128, "seed": 0}


class Encoder(torch.nn.Module):
    def __init__(self, bert: BertModel) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids).last_hidden_state


def reference_model(config: dict[str, Any], model_path: Path | None = None) -> Encoder:
    if model_path is not None:
        if not (model_path / "config.json").is_file():
            raise MlcwebError(f"{model_path} has no config.json: it is not a transformers BERT folder")
        return Encoder(
            BertModel.from_pretrained(model_path, add_pooling_layer=False, attn_implementation="eager")
        ).eval()
    torch.manual_seed(config["seed"])
    cfg = BertConfig(
        vocab_size=config["vocab"],
        hidden_size=config["hidden_size"],
        num_hidden_layers=config["layers"],
        num_attention_heads=config["heads"],
        intermediate_size=2 * config["hidden_size"],
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return Encoder(BertModel(cfg, add_pooling_layer=False)).eval()


@hookimpl
def mlcweb_models() -> list[ModelSpec]:
    return [ModelSpec("tiny-bert", "tiny random-weight BERT encoder (tests)", ("main",), dict(DEFAULT_CONFIG))]


@hookimpl
def mlcweb_import_model(spec: ModelSpec, options: ImportOptions) -> ImportedModel:
    config = {**spec.default_config, **options.config}
    model = reference_model(config, options.model_path)
    ids = torch.zeros(1, config["seq_len"], dtype=torch.int32)
    exported = torch.export.export(model, (ids,))
    mod = from_exported_program(exported, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    mod, params = mp.detach_params(mod)
    vocab = int(model.bert.config.vocab_size)
    return ImportedModel(
        mod=mod,
        params={"main": params},
        metadata={"seq_len": config["seq_len"]},
        input_ranges={"main": {"input_ids": (0, vocab - 1)}},
    )


@hookimpl
def mlcweb_write_assets(spec: ModelSpec, out_dir: Path, **_: object) -> list[str]:
    (out_dir / "bert-config.json").write_text(json.dumps(spec.default_config, sort_keys=True) + "\n")
    return ["bert-config.json"]

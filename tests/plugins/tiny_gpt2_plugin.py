"""A third mlcweb plugin, used by the tests: a tiny GPT-2 language model from transformers.

Its forward pass holds what the SD and BERT plugins do not: a boolean ``cumsum`` (position ids from the
attention mask), boolean causal masks and tied embeddings.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from tvm.relax.frontend.torch import from_exported_program

import mlcweb_passes as mp
from mlcweb import ImportedModel, ImportOptions, ModelSpec, hookimpl

DEFAULT_CONFIG: dict[str, Any] = {"seq_len": 16, "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab": 128, "seed": 0}


class LogitsOnly(torch.nn.Module):
    def __init__(self, model: GPT2LMHeadModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def reference_model(config: dict[str, Any]) -> LogitsOnly:
    torch.manual_seed(config["seed"])
    cfg = GPT2Config(
        vocab_size=config["vocab"],
        n_positions=2 * config["seq_len"],
        n_embd=config["n_embd"],
        n_layer=config["n_layer"],
        n_head=config["n_head"],
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return LogitsOnly(GPT2LMHeadModel(cfg)).eval()


@hookimpl
def mlcweb_models() -> list[ModelSpec]:
    return [ModelSpec("tiny-gpt2", "tiny random-weight GPT-2 language model (tests)", ("main",), dict(DEFAULT_CONFIG))]


@hookimpl
def mlcweb_import_model(spec: ModelSpec, options: ImportOptions) -> ImportedModel:
    config = {**spec.default_config, **options.config}
    model = reference_model(config)
    ids = torch.zeros(1, config["seq_len"], dtype=torch.int32)
    exported = torch.export.export(model, (ids,))
    mod = from_exported_program(exported, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    mod, params = mp.detach_params(mod)
    return ImportedModel(
        mod=mod, params={"main": params}, input_ranges={"main": {"input_ids": (0, config["vocab"] - 1)}}
    )

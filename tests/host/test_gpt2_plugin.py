"""A tiny GPT-2 (boolean cumsum and masks, tied embeddings) builds and matches transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mlcweb import BuildOptions
from mlcweb.build import build
from mlcweb.plugins import PluginHost
from mlcweb.runtime import load


def test_tiny_gpt2_builds_for_llvm_and_matches_transformers(tmp_path: Path) -> None:
    import tiny_gpt2_plugin

    host = PluginHost([("tiny_gpt2", tiny_gpt2_plugin)], entry_points=False)
    build(host, "tiny-gpt2", BuildOptions(target="llvm", out=tmp_path / "gpt2"), progress=False)
    ids = np.random.default_rng(0).integers(0, 128, size=(1, 16)).astype("int32")
    got = load(tmp_path / "gpt2")("main", ids).numpy()
    want = tiny_gpt2_plugin.reference_model(dict(tiny_gpt2_plugin.DEFAULT_CONFIG))(torch.from_numpy(ids))
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-5)

"""The WebGPU flash-attention kernel: tile choice, the pipeline's rewrite for float16 and float32, and its
numbers on Dawn (SwiftShader, float32) against numpy and PyTorch. The float16 kernels' WGSL is compiled
by Dawn here; their numbers are checked on a GPU by benchmarks/sd_webgpu.py (float16 against the float32
build on the same weights)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm
from attention_fixtures import LAVAPIPE_ICD, attention_module
from testutil import DiffusersAttention, import_torch, kernel_launches, op_names

import mlcweb_passes as mp
from mlcweb.wgsl_check import check_wgsl, wgsl_sources
from mlcweb_passes.cuda.flash_kernel import AttentionShape
from mlcweb_passes.webgpu.flash_attention import (
    TILES,
    WebGPUFlashTile,
    choose_webgpu_flash_tile,
    webgpu_flash_attention_kernel,
)

WASM = {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"}
WEBGPU = tvm.target.Target({"kind": "webgpu"}, host=WASM)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    s = np.einsum("bnhd,bmhd->bhnm", q.astype(np.float64), k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhnm,bmhd->bnhd", p / p.sum(-1, keepdims=True), v)


def test_tile_choice_fits_the_workgroup_memory() -> None:
    sd = AttentionShape(2, 4096, 4096, 8, 40)
    assert choose_webgpu_flash_tile(sd, "float16", 32768) == TILES[0]  # 64 query rows, 128 threads
    for dtype in ("float16", "float32"):
        for d in (40, 80, 160):
            for limit in (16384, 32768):
                shape = AttentionShape(2, 4096, 77, 8, d)
                tile = choose_webgpu_flash_tile(shape, dtype, limit)
                assert tile.shared_bytes(d, dtype) <= limit and tile.threads <= 256
                # TVM's WebGPU code generator, which counts the kernel's workgroup allocations, takes it
                target = tvm.target.Target({"kind": "webgpu", "max_shared_memory_per_block": limit}, host=WASM)
                tvm.compile(attention_module(shape, dtype=dtype, scale=1.0, tile=tile, max_shared=limit), target)
    assert choose_webgpu_flash_tile(AttentionShape(1, 10, 10, 1, 8), "float32").rows == 16  # no idle rows
    with pytest.raises(ValueError, match="fits 1024 bytes"):
        choose_webgpu_flash_tile(sd, "float32", 1024)
    with pytest.raises(ValueError, match="does not support"):
        webgpu_flash_attention_kernel(AttentionShape(1, 64, 64, 1, 512), 1.0)  # the VAE's head


@pytest.mark.parametrize(
    ("shape", "tile", "lavapipe"),
    [
        (AttentionShape(1, 70, 70, 2, 20), None, False),  # partial query and key tiles, head padded 20 -> 24
        (AttentionShape(2, 33, 19, 1, 16), WebGPUFlashTile(16, 8, 2), False),  # cross-attention, smallest tile
        # 8 rows a thread (a candidate for float32's heads of 40) over a partial second key tile:
        # SwiftShader did not finish this shader in 400 s (over 64 keys: 34 s; 4 rows a thread over 45
        # keys: 35 s), which had looked like a fault of the kernel; lavapipe runs it, so the stall is
        # SwiftShader's
        pytest.param(
            AttentionShape(1, 64, 45, 1, 40),
            WebGPUFlashTile(64, 32, 8),
            True,
            marks=pytest.mark.skipif(not LAVAPIPE_ICD.is_file(), reason="needs Mesa's lavapipe"),
        ),
    ],
)
def test_kernel_computes_attention_on_webgpu(
    shape: AttentionShape, tile: WebGPUFlashTile | None, lavapipe: bool
) -> None:
    """Float32 in and out on Dawn (SwiftShader, or lavapipe): within 1e-5 of float64 numpy."""
    from webgpu_node import LAVAPIPE, SWIFTSHADER, run_on_webgpu
    from webgpu_node import WEBGPU as NODE_TARGET

    rng = np.random.default_rng(0)
    q, k, v = (
        rng.standard_normal((shape.batch, n, shape.heads, shape.head_dim)).astype(np.float32)
        for n in (shape.q_len, shape.kv_len, shape.kv_len)
    )
    scale = shape.head_dim**-0.5
    exe = tvm.compile(attention_module(shape, dtype="float32", scale=scale, tile=tile), NODE_TARGET)
    got = run_on_webgpu(exe, "main", [q, k, v], icd=LAVAPIPE if lavapipe else SWIFTSHADER)
    np.testing.assert_allclose(got, _attention(q, k, v, scale), rtol=0, atol=1e-5)


def _imported() -> tuple[torch.nn.Module, list[torch.Tensor], tvm.IRModule, list[np.ndarray]]:
    torch.manual_seed(0)
    model = DiffusersAttention(heads=2).eval()
    inputs = [torch.randn(2, 24, 32), torch.randn(2, 7, 24)]
    mod, params = mp.detach_params(import_torch(model, inputs))
    return model, inputs, mod, [p.numpy() for p in params.values()]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_pipeline_rewrites_attention_for_both_dtypes(dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The webgpu pipeline turns the attention into one kernel with no score matrix and no head
    transposes, in float32 and float16, and Dawn compiles every shader."""
    monkeypatch.setenv("MLCWEB_WGSL_CHECK", "require")
    _, _, mod, _ = _imported()
    options = mp.PipelineOptions(dtype=dtype)
    with WEBGPU:
        graph = mp.pipeline(WEBGPU, options, until="graph")(mod)
    assert "relax.nn.softmax" not in op_names(graph) and "relax.permute_dims" not in op_names(graph)
    kernels = [gv.name_hint for gv in graph.functions if gv.name_hint.startswith("flash_attention")]
    assert kernels == ["flash_attention"]
    exe = tvm.compile(mod, WEBGPU, relax_pipeline=mp.pipeline(WEBGPU, options))
    sources = wgsl_sources(exe.mod)
    assert any(name.startswith("flash_attention") for name in sources)
    assert check_wgsl(exe.mod, float16=dtype == "float16") == len(sources)


def test_a_build_can_prefer_its_own_tiles() -> None:
    """``PipelineOptions.webgpu_flash_tiles``: a build's tiles (measured ones, or candidates to time) come
    before :data:`TILES` where they fit: 128 query rows of 4 a thread make a 256-thread workgroup, where
    the default tile has 128 threads (and only 16 rows here: 24 queries); one past the workgroup memory
    is passed over."""
    _, _, mod, _ = _imported()
    tile = WebGPUFlashTile.parse("16x16x1")
    assert tile == WebGPUFlashTile(16, 16, 1) and tile.spec == "16x16x1"
    assert WebGPUFlashTile.parse("128x32").threads == 256
    for bad in ("128", "64x30", "axb", "64x32x3"):
        with pytest.raises(ValueError, match="flash-attention tile"):
            WebGPUFlashTile.parse(bad)
    too_large = WebGPUFlashTile(512, 512, 8)  # 1 MiB of scores alone
    for first, threads in (((), 16 // 4 * 8), ((too_large, tile), 16 * 8)):
        options = mp.PipelineOptions(webgpu_flash_tiles=first)
        exe = tvm.compile(mod, WEBGPU, relax_pipeline=mp.pipeline(WEBGPU, options))
        (code,) = [c for name, c in wgsl_sources(exe.mod).items() if name.startswith("flash_attention")]
        sizes = re.search(r"@workgroup_size\((\d+), (\d+), (\d+)\)", code)
        assert sizes is not None and np.prod([int(n) for n in sizes.groups()]) == threads


def test_without_flash_attention_the_scores_are_materialised() -> None:
    _, _, mod, _ = _imported()
    with WEBGPU:
        graph = mp.pipeline(WEBGPU, mp.PipelineOptions(flash_attention=False), until="graph")(mod)
    assert "relax.nn.softmax" in op_names(graph)


def test_the_pipelines_attention_matches_pytorch_on_webgpu() -> None:
    """The whole float32 webgpu pipeline (projections, the flash kernel, output projection) on Dawn
    gives PyTorch's SDPA result within 1e-5."""
    from webgpu_node import WEBGPU as NODE_TARGET
    from webgpu_node import run_on_webgpu

    model, inputs, mod, params = _imported()
    exe = tvm.compile(mod, NODE_TARGET, relax_pipeline=mp.pipeline(NODE_TARGET))
    got = run_on_webgpu(exe, "main", [x.numpy() for x in inputs] + params)
    want = model(*inputs).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_merged_projections_are_read_in_place_on_webgpu() -> None:
    """diffusers' self-attention and a cross-attention with their projections merged (as the SD plugin
    does for webgpu builds): the float32 pipeline on Dawn gives one GEMM for Q, K, V, one for the text's K
    and V, flash kernels reading them as views (no split copies them out), and PyTorch's result within 1e-5."""
    from diffusers.models.attention_processor import Attention
    from webgpu_node import WEBGPU as NODE_TARGET
    from webgpu_node import run_on_webgpu

    class SelfThenCross(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.own = Attention(query_dim=48, heads=2, dim_head=24)
            self.text = Attention(query_dim=48, cross_attention_dim=32, heads=2, dim_head=24)

        def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            return self.text(self.own(x), text)

    torch.manual_seed(0)
    model = SelfThenCross().eval()
    inputs = [torch.randn(2, 40, 48), torch.randn(2, 7, 32)]
    mod, params = mp.detach_params(import_torch(model, inputs))
    merge = {"weights": [mp.MergeProjections()]}
    with NODE_TARGET:
        graph = mp.pipeline(NODE_TARGET, extra=merge, until="graph")(mod)
    ops = op_names(graph)
    assert "relax.split" not in ops and "relax.nn.softmax" not in ops
    launched = [b.value.args[0].name_hint for b in kernel_launches(graph)]
    # Q/K/V, Q, text K/V, two output projections: five GEMMs where there were eight
    assert sum(name.startswith("matmul_nt") for name in launched) == 5
    assert sum(name.startswith("flash_attention") for name in launched) == 2
    exe = tvm.compile(mod, NODE_TARGET, relax_pipeline=mp.pipeline(NODE_TARGET, extra=merge))
    got = run_on_webgpu(exe, "main", [x.numpy() for x in inputs] + [p.numpy() for p in params.values()])
    with torch.no_grad():
        want = model(*inputs).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

"""webgpu/lane_attention: float16 flash attention in hand-written WGSL on the lanes.

The kernel needs subgroups and shader-f16 only, so lavapipe runs it as written: installed in place of TVM's
shader as the page does, checked against float64 numpy with partial query and key tiles, merged-projection
views, a head padded past its width and keys scaled so rows' maxima move between steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
from attention_fixtures import CONFIG, LAVAPIPE_ICD, attention, attention_module, attention_plans

from mlcweb.wgsl_check import wgsl_sources
from mlcweb_passes.cuda.flash_kernel import AttentionShape
from mlcweb_passes.gemm_analysis import UnsupportedGemmError
from mlcweb_passes.webgpu.lane_attention import LAYOUTS, LanePlan, choose_lane_layout, shared_bytes
from mlcweb_passes.webgpu.matrix_attention import attention_kernels

NO_VIEWS = (None, None, None)


def test_layouts_fit_the_workgroup_memory() -> None:
    """SD's heads (40, 80, 160) each get the largest layout within 32 KiB; a head too wide for any is refused."""
    assert choose_lane_layout(40, 32768) == (64, 32) == LAYOUTS[0]
    assert choose_lane_layout(80, 32768) == (32, 16)
    assert choose_lane_layout(80, 49152) == (32, 32)
    assert choose_lane_layout(160, 32768) == (16, 16)
    for d in (40, 80, 160):
        assert shared_bytes(*choose_lane_layout(d, 32768), d) <= 32768
    # float32 Q and K rows padded by 4 elements, V unpadded, probabilities: one 4-wide word a row group and key
    assert shared_bytes(64, 32, 40) == 4 * (96 * 44 + 32 * 40 + 32 * 17 * 4)
    with pytest.raises(UnsupportedGemmError, match="head dimension 512"):
        choose_lane_layout(512, 32768)


def test_kernels_for_sd_compile_on_dawn(monkeypatch: pytest.MonkeyPatch) -> None:
    """SD1.5's attentions on the lanes, as written for the GPU: Dawn compiles them (a workgroup a layout's
    rows of each head)."""
    from webgpu_node import WEBGPU

    from mlcweb.wgsl_check import check_matrix_wgsl

    monkeypatch.setenv("MLCWEB_WGSL_CHECK", "require")
    shapes = [
        (AttentionShape(2, 4096, 4096, 8, 40), ((3, 0), (3, 1), (3, 2)), 64),  # 64x64 latents, merged QKV
        (AttentionShape(2, 4096, 77, 8, 40), NO_VIEWS, 64),  # cross-attention at 64x64
        (AttentionShape(2, 256, 256, 8, 160), NO_VIEWS, 16),  # self-attention at 16x16
    ]
    for shape, views, rows in shapes:
        mod = attention_module(shape, views)
        plans = attention_plans(mod, lanes=True)
        kernel = attention_kernels(plans, wgsl_sources(tvm.compile(mod, WEBGPU).mod), CONFIG)["flash_attention_kernel"]
        assert kernel.grid == (shape.q_len // rows, 16, 1)
        assert check_matrix_wgsl({kernel.name: kernel.code}) == 1


def test_plans_float16_kernels_only() -> None:
    """A float16 flash attention is planned on the lanes with its shape and views; a float32 one is not."""
    shape = AttentionShape(2, 70, 70, 2, 24)
    plans = attention_plans(attention_module(shape, ((3, 0), (3, 1), (3, 2))), lanes=True)
    plan = LanePlan.from_json(plans["flash_attention"])
    assert (plan.rows, plan.keys, plan.threads, plan.grid) == (64, 32, 128, (2, 4, 1))
    assert "* 3i + 1i)" in plan.helpers  # K is part 1 of 3 of the merged projection
    assert attention_plans(attention_module(shape, NO_VIEWS, "float32"), lanes=True) == {}


def test_kernel_computes_attention() -> None:
    """Merged Q/K/V of 70 tokens (partial query and key tiles), head 12 padded to 16 (a masked output
    column), keys past the first step scaled 6x (the running maximum moves): float64 numpy's attention
    within 1e-2 of the output's scale (float16 inputs and output)."""
    from webgpu_node import WEBGPU, run_on_webgpu

    shape, views = AttentionShape(2, 70, 70, 2, 12), ((3, 0), (3, 1), (3, 2))
    mod = attention_module(shape, views)
    exe = tvm.compile(mod, WEBGPU)
    kernels = attention_kernels(attention_plans(mod, lanes=True), wgsl_sources(exe.mod), CONFIG)
    kernel = kernels["flash_attention_kernel"]
    assert kernel.grid == (2, 4, 1) and "subgroupShuffleXor" in kernel.code
    table = json.loads(json.dumps({k.name: {"code": k.code, "grid": list(k.grid)} for k in kernels.values()}))
    rng = np.random.default_rng(1)
    qkv = rng.standard_normal((2, 70, 3, 2, 12)).astype(np.float16)
    qkv[:, 32:, 1] *= np.float16(6.0)
    got = run_on_webgpu(exe, "main", [qkv], icd=LAVAPIPE_ICD, matrix=table).astype(np.float32)
    want = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], 12**-0.5)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * float(np.abs(want).max()))


def test_the_pipeline_plans_lanes_when_asked() -> None:
    """``PipelineOptions(webgpu_attention="lanes")`` plans the attentions on the lanes."""
    from webgpu_node import WEBGPU

    import mlcweb_passes as mp
    from mlcweb_passes.webgpu.matrix_attention import PLANS_ATTR

    options = mp.PipelineOptions(dtype="float16", webgpu_matrix=CONFIG, webgpu_attention="lanes")
    with WEBGPU:
        lowered = mp.pipeline(WEBGPU, options)(attention_module(AttentionShape(1, 64, 64, 2, 40), NO_VIEWS))
    planned = dict((lowered.attrs or {}).get(PLANS_ATTR, {}))
    assert [json.loads(str(p))["form"] for p in planned.values()] == ["lanes"]


def test_prefetched_tiles_compute_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``PREFETCH`` each step's K and V come through registers read during the step before: the same
    attention on lavapipe (partial key tiles: the last step's reads past the sequence are zeros)."""
    from webgpu_node import WEBGPU, run_on_webgpu

    from mlcweb_passes.webgpu import lane_attention

    monkeypatch.setattr(lane_attention, "PREFETCH", True)
    shape = AttentionShape(2, 33, 19, 1, 20)
    mod = attention_module(shape, NO_VIEWS)
    exe = tvm.compile(mod, WEBGPU)
    plans = attention_plans(mod, lanes=True)
    assert LanePlan.from_json(plans["flash_attention"]).prefetch
    kernels = attention_kernels(plans, wgsl_sources(exe.mod), CONFIG)
    table = {k.name: {"code": k.code, "grid": list(k.grid)} for k in kernels.values()}
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, n, 1, 20)).astype(np.float16) for n in (33, 19, 19))
    got = run_on_webgpu(exe, "main", [q, k, v], icd=LAVAPIPE_ICD, matrix=table).astype(np.float32)
    want = attention(q, k, v, 20**-0.5)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * float(np.abs(want).max()))

"""webgpu/matrix_attention: float16 flash attention on subgroup matrices, beside the portable kernel.

As for the GEMMs (test_matrix_gemm.py), no adapter here has subgroup matrices: the kernels run as written
except for the matrix operations, which ``emulate=True`` has the lanes do on the same workgroup memory
(lavapipe: shader-f16 and subgroups). The copies, the zero padding of the head and of partial query and
key tiles, merged-projection views, the online softmax with its subgroup shuffles, the output's rescale
through the scratch and the bindings and grid are checked against float64 numpy; the kernels as written
for the GPU are compiled by Dawn's null backend.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tvm
from attention_fixtures import CONFIG, LAVAPIPE_ICD, attention, attention_module, attention_plans

from mlcweb.wgsl_check import wgsl_sources
from mlcweb_passes.cuda.flash_kernel import AttentionShape, Views
from mlcweb_passes.gemm_analysis import UnsupportedGemmError
from mlcweb_passes.webgpu.matrix_attention import PLANS_ATTR, AttentionPlan, attention_kernels, choose_layout


def test_layouts_fit_the_workgroup_memory() -> None:
    """Heads of 40 and 80 (SD1.5's 64x64 and 32x32 latents) get four subgroups (64 query rows) and 16 keys
    a step within 32 KiB (19 and 25.5 KiB: the scratch holds a step's scores and 16 columns of the output
    at a time), 160-wide heads two subgroups (27 KiB); less memory, two subgroups; too little, none (the
    portable kernel stays). With Q's tile sharing an array, heads of 40 (at most ``NARROW_HEAD`` wide)
    take eight subgroups (128 rows, 24 KiB); wider ones keep four."""
    assert choose_layout(40, 32768) == choose_layout(80, 32768) == (4, 16)
    assert choose_layout(40, 32768, union=True) == (8, 16)
    assert choose_layout(64, 49152, union=True) == choose_layout(80, 49152, union=True) == (4, 16)
    assert choose_layout(160, 32768) == choose_layout(40, 12000) == (2, 16)
    with pytest.raises(UnsupportedGemmError, match="fits 12000 bytes"):
        choose_layout(160, 12000)


@pytest.mark.parametrize("union", [True, False])
def test_kernels_compile_on_subgroup_matrices(monkeypatch: pytest.MonkeyPatch, union: bool) -> None:
    """SD1.5's attention shapes as written for the GPU (not emulated): Dawn (null backend) compiles them;
    the grid is a workgroup per 64 query rows of each head (heads of 40 with Q's tile shared: 128; apart,
    160-wide heads: 32); the kernel keeps the forms that matched a float64 reference on the GPU
    (``benchmarks/webgpu/attention_check.mjs``, sixteenth and seventeenth runs): every right operand read
    column-major, the rescale flag declared before the arrays (declared after them, the products came out
    wrong), and either Q's tile sharing one float16 array with the K, V and probability tiles (``UNION``,
    the default) or each operand in an array of its own."""
    from webgpu_node import WEBGPU

    from mlcweb.wgsl_check import check_matrix_wgsl
    from mlcweb_passes.webgpu import matrix_attention

    monkeypatch.setenv("MLCWEB_WGSL_CHECK", "require")
    monkeypatch.setattr(matrix_attention, "UNION", union)
    shapes = [
        (AttentionShape(2, 4096, 4096, 8, 40), ((3, 0), (3, 1), (3, 2)), 128 if union else 64),  # 64x64, QKV
        (AttentionShape(2, 4096, 77, 8, 40), (None, None, None), 128 if union else 64),  # cross at 64x64
        (AttentionShape(2, 1024, 77, 8, 80), (None, None, None), 64),  # cross-attention at 32x32
        (AttentionShape(2, 256, 256, 8, 160), ((3, 0), (3, 1), (3, 2)), 64 if union else 32),  # 16x16 self
    ]
    for shape, views, rows in shapes:
        mod = attention_module(shape, views)
        kernels = attention_kernels(attention_plans(mod), wgsl_sources(tvm.compile(mod, WEBGPU).mod), CONFIG)
        kernel = kernels["flash_attention_kernel"]
        assert kernel.grid == (shape.q_len // rows, 16, 1)
        assert "subgroupMatrixMultiplyAccumulate" in kernel.code and "subgroupShuffleXor" in kernel.code
        # right operands only column-major, as the GEMMs read theirs (the forms checked on the GPU)
        right = re.findall(r"Load<subgroup_matrix_right<f16, 16, 16>>\([^;]*, (true|false), \d+u\)", kernel.code)
        assert right and set(right) == {"true"}
        uses: dict[str, set[tuple[str, str]]] = {}
        pattern = r"Load<subgroup_matrix_(\w+)<[^>]*>>\(&(\w+), [^;]*, (\d+)u\)"
        for kind, array, stride in re.findall(pattern, kernel.code):
            uses.setdefault(array, set()).add((kind, stride))
        if union:  # Q, K, V and P in one float16 array, the float32 scratch apart
            assert set(uses) == {"mlcweb_hs", "mlcweb_ss"}, uses
        else:  # each workgroup array read as one operand (kind and stride)
            assert len(uses) == 5 and all(len(u) == 1 for u in uses.values()), uses
        # the flag first: every form with it declared after the K/V arrays computed wrong products on an H100
        declared = re.findall(r"^var<workgroup> (\w+)", kernel.code, re.M)
        assert declared[0] == "mlcweb_flag" and set(uses) == set(declared[1:]), declared
        assert check_matrix_wgsl({kernel.name: kernel.code}) == 1


@pytest.mark.parametrize("kernel", ["matrix", "portable"])
def test_the_pipeline_plans_attention_unless_told_not_to(kernel: str) -> None:
    """``PipelineOptions(webgpu_attention="matrix")`` (the default) adds the planning pass to the kernel
    phase; ``"portable"`` leaves TVM's kernel alone."""
    from webgpu_node import WEBGPU

    import mlcweb_passes as mp

    options = mp.PipelineOptions(dtype="float16", webgpu_matrix=CONFIG, webgpu_attention=kernel)
    with WEBGPU:
        lowered = mp.pipeline(WEBGPU, options)(attention_module(AttentionShape(1, 64, 64, 2, 40), (None, None, None)))
    planned = dict((lowered.attrs or {}).get(PLANS_ATTR, {}))
    assert sorted(planned) == (["flash_attention"] if kernel == "matrix" else [])


def test_plans_float16_kernels_only() -> None:
    """A float16 kernel is planned with its shape, views in its helpers, its parameters; a float32 one
    keeps the portable kernel alone."""
    shape = AttentionShape(2, 70, 70, 2, 40)
    plans = attention_plans(attention_module(shape, ((3, 0), (3, 1), (3, 2))))
    plan = AttentionPlan.from_json(plans["flash_attention"])
    assert (plan.batch, plan.q_len, plan.kv_len, plan.heads, plan.head_dim) == (2, 70, 70, 2, 40)
    assert plan.padded_dim == 48 and plan.params == ("q", "k", "v", "o")
    assert "* 3i + 1i" in plan.helpers  # K is part 1 of the merged projections
    assert AttentionPlan.from_json(plan.to_json()) == plan
    assert attention_plans(attention_module(shape, (None, None, None), "float32")) == {}


@pytest.mark.skipif(not LAVAPIPE_ICD.is_file(), reason="needs Mesa's lavapipe")
@pytest.mark.parametrize(
    ("shape", "views", "max_shared", "boost", "double"),
    [
        # merged projections, 70 queries and keys (partial query and key tiles), head 24 padded to 32, four
        # subgroups (eight need 20 KiB), K/V read a step ahead; keys past the second step scaled up 6x, so
        # rows' maxima jump past TAU and the output is rescaled, 16 columns at a time; two K/V tiles
        # taking turns (DOUBLE_BUFFER) and one
        (AttentionShape(2, 70, 70, 2, 24), ((3, 0), (3, 1), (3, 2)), 20000, 6.0, True),
        (AttentionShape(2, 70, 70, 2, 24), ((3, 0), (3, 1), (3, 2)), 20000, 6.0, False),
        # whole steps of keys (48: no score masked), separate inputs, 40-wide heads padded to 48
        (AttentionShape(1, 40, 48, 2, 40), (None, None, None), 20000, 1.0, True),
    ],
)
def test_emulated_kernel_computes_attention(
    monkeypatch: pytest.MonkeyPatch,
    shape: AttentionShape,
    views: Views,
    max_shared: int | None,
    boost: float,
    double: bool,
) -> None:
    """The kernel, matrix operations done by lanes, installed in place of TVM's shader as the page does:
    float64 numpy's attention within 1e-2 of the output's scale (float16 inputs, probabilities and output)."""
    from webgpu_node import LAVAPIPE, WEBGPU, run_on_webgpu

    from mlcweb_passes.webgpu import matrix_attention

    # the same layout either way, two K/V tiles however short the walk (the builds keep them to narrow
    # heads' layouts walking DOUBLE_MIN_STEPS steps or more)
    monkeypatch.setattr(matrix_attention, "NARROW_LAYOUTS", ((4, 16),))
    monkeypatch.setattr(matrix_attention, "DOUBLE_MIN_STEPS", 1)
    monkeypatch.setattr(matrix_attention, "DOUBLE_BUFFER", double)
    mod = attention_module(shape, views)
    plans = attention_plans(mod, max_shared)
    assert AttentionPlan.from_json(plans["flash_attention"]).buffers == (2 if double else 1)
    exe = tvm.compile(mod, WEBGPU)
    kernels = attention_kernels(plans, wgsl_sources(exe.mod), CONFIG, emulate=True)
    assert list(kernels) == ["flash_attention_kernel"]
    kernel = kernels["flash_attention_kernel"]
    rows = 16 * AttentionPlan.from_json(plans["flash_attention"]).subgroups
    assert kernel.grid == (-(-shape.q_len // rows), shape.batch * shape.heads, 1)
    table = json.loads(json.dumps({k.name: {"code": k.code, "grid": list(k.grid)} for k in kernels.values()}))
    rng = np.random.default_rng(1)
    b, h, d = shape.batch, shape.heads, shape.head_dim
    if views[0] is not None:
        qkv = rng.standard_normal((b, shape.q_len, 3, h, d)).astype(np.float16)
        qkv[:, 32:, 1] *= np.float16(boost)
        q, k, v, inputs = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], [qkv]
    else:
        q, k, v = (
            rng.standard_normal((b, n, h, d)).astype(np.float16) for n in (shape.q_len, shape.kv_len, shape.kv_len)
        )
        k[:, 32:] *= np.float16(boost)
        inputs = [q, k, v]
    got = run_on_webgpu(exe, "main", inputs, icd=LAVAPIPE, matrix=table).astype(np.float32)
    want = attention(q, k, v, d**-0.5)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * float(np.abs(want).max()))


def test_the_union_form_shares_q_tile_with_the_step_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """``UNION``: Q's tile and the K, V and probability tiles in one float16 array (Q is in registers
    before the first K/V tile is stored), the flag still declared first. Heads of 40 take 12 KiB of
    workgroup memory instead of 19, and 160-wide heads fit four subgroups (64 rows) within 32 KiB.
    Dawn (null backend) compiles each; the emulated form keeps its arrays apart (it reads Q every step)."""
    from webgpu_node import WEBGPU

    from mlcweb.wgsl_check import check_matrix_wgsl
    from mlcweb_passes.webgpu import matrix_attention

    monkeypatch.setenv("MLCWEB_WGSL_CHECK", "require")
    monkeypatch.setattr(matrix_attention, "UNION", True)
    assert matrix_attention._shared_bytes(4, 16, 48, union=True) == 3584 * 2 + 1280 * 4 + 16
    assert matrix_attention._shared_bytes(4, 16, 48) == (3584 + 896 + 1152 + 1536) * 2 + 1280 * 4 + 16
    for shape, views, subgroups in [
        (AttentionShape(2, 4096, 4096, 8, 40), ((3, 0), (3, 1), (3, 2)), 8),  # NARROW_LAYOUTS
        (AttentionShape(2, 256, 256, 8, 160), ((3, 0), (3, 1), (3, 2)), 4),  # 27 KiB apart: 2 subgroups
    ]:
        mod = attention_module(shape, views)
        plans = attention_plans(mod)
        plan = AttentionPlan.from_json(plans["flash_attention"])
        assert plan.union and plan.subgroups == subgroups
        assert plan.buffers == (2 if subgroups == 8 else 1)  # two K/V tiles: the narrow layout's long walk
        sources = wgsl_sources(tvm.compile(mod, WEBGPU).mod)
        kernel = attention_kernels(plans, sources, CONFIG)["flash_attention_kernel"]
        declared = re.findall(r"^var<workgroup> (\w+) : array<(\w+), (\d+)>;", kernel.code, re.M)
        assert kernel.code.index("var<workgroup> mlcweb_flag") < kernel.code.index("var<workgroup> mlcweb_hs")
        assert [(name, kind) for name, kind, _ in declared] == [("mlcweb_hs", "f16"), ("mlcweb_ss", "f32")]
        assert not re.search(r"mlcweb_(qs|ks|vs|ps)\b", kernel.code)
        dp = -(-shape.head_dim // 16) * 16
        rows = 16 * subgroups
        q, step = rows * (dp + 8), plan.buffers * (16 * (dp + 8) + dp * 24) + rows * 24
        assert int(declared[0][2]) == max(q, step)
        assert check_matrix_wgsl({kernel.name: kernel.code}) == 1
        emulated = attention_kernels(plans, sources, CONFIG, True)["flash_attention_kernel"]
        assert "mlcweb_hs" not in emulated.code and "mlcweb_qs" in emulated.code


@pytest.mark.parametrize(("double", "barriers"), [(True, 3), (False, 5)])
def test_double_buffered_steps_have_three_barriers(
    monkeypatch: pytest.MonkeyPatch, double: bool, barriers: int
) -> None:
    """SD1.5's 64x64 self-attention walks 256 steps of 16 keys; with two K/V tiles taking turns
    (``DOUBLE_BUFFER``), a step's next tile is stored behind the barrier after its scores, so a step
    (the rescale aside) waits at 3 workgroup barriers instead of 5 (``workgroupUniformLoad`` is two:
    Tint puts a barrier before and after the load). The two tiles take Q's tile's place in the shared
    array (14 KiB either way, 24 KiB with the scratch), and whole steps leave the scores unmasked (4096
    keys: no ``select`` a score)."""
    from webgpu_node import WEBGPU

    from mlcweb.wgsl_check import check_matrix_wgsl
    from mlcweb_passes.webgpu import matrix_attention

    monkeypatch.setenv("MLCWEB_WGSL_CHECK", "require")
    monkeypatch.setattr(matrix_attention, "DOUBLE_BUFFER", double)
    mod = attention_module(AttentionShape(2, 4096, 4096, 8, 40), ((3, 0), (3, 1), (3, 2)))
    plans = attention_plans(mod)
    assert AttentionPlan.from_json(plans["flash_attention"]).buffers == (2 if double else 1)
    kernel = attention_kernels(plans, wgsl_sources(tvm.compile(mod, WEBGPU).mod), CONFIG)["flash_attention_kernel"]
    loop = kernel.code.split("for (var kt = 0i; kt < 256i; kt++) {", 1)[1]
    rescale_at = loop.index("if (rescale == 1u")
    step = loop[:rescale_at] + loop[loop.index("let pa0", rescale_at) :].split("l += subgroupShuffleXor", 1)[0]
    assert step.count("workgroupBarrier();") + 2 * step.count("workgroupUniformLoad(") == barriers
    assert "select(" not in step
    assert check_matrix_wgsl({kernel.name: kernel.code}) == 1


def test_two_kv_tiles_only_where_they_measured_faster() -> None:
    """On an H100, two K/V tiles made SD1.5's 64x64 self-attention (heads of 40 on 8 subgroups, 256
    steps) 7% faster in the UNet, but its cross-attentions (5 steps) slower, 80-wide heads on 4 subgroups
    no faster and SD2.1's 64-wide heads 35% slower; so builds take them for narrow heads' layouts walking
    at least ``DOUBLE_MIN_STEPS`` steps."""
    cases = [
        (AttentionShape(2, 4096, 4096, 8, 40), ((3, 0), (3, 1), (3, 2)), 2),  # SD1.5 64x64 self-attention
        (AttentionShape(2, 4096, 77, 8, 40), (None, None, None), 1),  # its cross-attention
        (AttentionShape(2, 1024, 1024, 8, 80), ((3, 0), (3, 1), (3, 2)), 1),  # 32x32 self-attention
        (AttentionShape(2, 4096, 4096, 5, 64), ((3, 0), (3, 1), (3, 2)), 1),  # SD2.1's heads of 64
    ]
    for shape, views, buffers in cases:
        plan = AttentionPlan.from_json(attention_plans(attention_module(shape, views))["flash_attention"])
        assert plan.buffers == buffers, shape

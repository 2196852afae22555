"""webgpu/matrix_gemm: float16 GEMMs on subgroup matrices, written from each fused PrimFunc.

No adapter here has subgroup matrices, so the kernels are run as written except for the matrix
operations, which ``emulate=True`` has the lanes do on the same workgroup memory (lavapipe, which has
shader-f16): operand addressing (a padded 3x3 window, a split-K slice, a partial row tile), the copies
to workgroup memory, the epilogue, the bindings TVM's shader declares and the grid are all checked
against numpy on the CPU.
The matrix operations themselves run on the GPU machine (benchmarks/webgpu/matrix_gemm.mjs and
``sd_webgpu.py run``, which compares the model's outputs with and without them).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tvm
from gemm_fixtures import Gemms
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp
from mlcweb.wgsl_check import check_matrix_wgsl, wgsl_sources
from mlcweb_passes.gemm_analysis import UnsupportedGemmError
from mlcweb_passes.webgpu import matrix_gemm
from mlcweb_passes.webgpu.matrix_gemm import (
    PLANS_ATTR,
    TILE_ORDER,
    MatrixConfig,
    MatrixPlan,
    MatrixTile,
    choose_matrix_tile,
    matrix_kernels,
    plan_matrix_gemm,
)

CONFIG = MatrixConfig()


def test_plans_the_gemms_it_can_run() -> None:
    """A padded 3x3 convolution with bias, scale and residual and a split-K slice are planned; fewer than
    32 output columns, column pairs (GEGLU) and a strided reduction are not."""
    conv = plan_matrix_gemm(Gemms["conv3x3_bias_residual"], CONFIG, 32768)
    assert (conv.batch, conv.m, conv.n, conv.k, conv.tile) == (1, 128, 128, 576, MatrixTile(64, 128, 32))
    assert conv.params == ("x", "w", "bias", "res", "out")
    assert "select(vec4<f16>(), v, " in conv.helpers  # the window's zero padding
    assert "mlcweb_set_{P4}(((gemm_m * 128i) + gemm_n)" in conv.helpers
    split = plan_matrix_gemm(Gemms["conv_split_k"], CONFIG, 32768)
    assert (split.batch, split.m, split.n, split.tile.cols) == (2, 128, 64, 64)
    assert MatrixPlan.from_json(split.to_json()) == split
    for name, why in [
        ("conv_out", "no tile divides"),
        ("geglu", "computed indices"),
        ("strided_weight", "not innermost"),
    ]:
        with pytest.raises(UnsupportedGemmError, match=why):
            plan_matrix_gemm(Gemms[name], CONFIG, 32768)


def test_tiles() -> None:
    """The first tile of TILE_ORDER that divides the GEMM and fits the workgroup memory; 16-deep when K is
    16 * odd."""
    assert choose_matrix_tile(8192, 2560, 320, CONFIG, 32768) == MatrixTile(64, 128, 32)
    assert choose_matrix_tile(8192, 320, 2880, CONFIG, 32768) == MatrixTile(64, 64, 32)
    assert choose_matrix_tile(128, 96, 64, CONFIG, 32768) == MatrixTile(64, 32, 32)
    assert choose_matrix_tile(64, 1280, 48, CONFIG, 32768) == MatrixTile(64, 128, 16)
    assert choose_matrix_tile(8192, 1280, 1280, CONFIG, 16384) == MatrixTile(64, 32, 32)  # WebGPU default limit
    # CLIP's 2 x 77 tokens: no tile divides, the last row tile is partial
    assert choose_matrix_tile(154, 768, 768, CONFIG, 32768) == MatrixTile(64, 128, 32)
    with pytest.raises(UnsupportedGemmError):
        choose_matrix_tile(48, 768, 768, CONFIG, 32768)  # fewer rows than a tile


def test_tile_layouts() -> None:
    """Deeper tiles, other subgroup grids and the scratch in turns: written and read back as specs, their
    workgroup memory counted, chosen in the order given (a 64-deep tile made 32 deep where K needs it)."""
    deep = MatrixTile.parse("64x128x64/r2")
    assert deep == MatrixTile(64, 128, 64, (4, 2), 2) and deep.spec() == "64x128x64/r2"
    assert MatrixTile.parse("64x128x32/2x2").grid == (2, 2) and MatrixTile(64, 128, 32).spec() == "64x128x32"
    # operands 2 x (64 + 128) x (64 + 8) halves; scratch: 4 of 8 subgroups' 16 x 16 floats at a time
    assert deep.shared_bytes(CONFIG) == 27648 + 4096 <= 32768 < replace(deep, rounds=1).shared_bytes(CONFIG)
    order = (deep, MatrixTile(64, 32, 64, (2, 2)))
    assert choose_matrix_tile(2048, 1280, 11520, CONFIG, 32768, order) == deep
    assert choose_matrix_tile(2048, 1280, 2080, CONFIG, 32768, order) == replace(deep, depth=32)
    assert choose_matrix_tile(256, 96, 64, CONFIG, 32768, order) == MatrixTile(64, 32, 64, (2, 2))
    # a GEMM of at most a wave of workgroups walks 64 deep (scratch in turns to fit 32 KiB); more: 32
    assert choose_matrix_tile(512, 1280, 1280, CONFIG, 32768, wave=128) == deep  # 8 x 10 workgroups
    assert choose_matrix_tile(512, 1280, 1280, CONFIG, 32768, wave=128, batch=2) == MatrixTile(64, 128, 32)
    assert choose_matrix_tile(512, 1280, 1312, CONFIG, 32768, wave=128) == MatrixTile(64, 128, 32)  # K: 41 x 32
    assert not MatrixTile(64, 128, 64, (4, 2), 3).fits(CONFIG)  # turns must divide the subgroups
    assert not MatrixTile(32, 128, 32, (4, 2)).fits(CONFIG)  # 8-row shares
    with pytest.raises(ValueError, match="ROWSxCOLSxDEPTH"):
        MatrixTile.parse("64x128")


def test_large_tiles_need_waves_and_memory() -> None:
    """A tile with ``min_waves`` is taken only where its grid fills that many waves; 128x128 tiles 64 deep
    need 44 KiB (operands 2 x 256 x 72 halves, scratch 8 x 16 x 16 floats), so only where the workgroup
    memory given allows."""
    big = MatrixTile.parse("128x128x64/w1")
    assert big == MatrixTile(128, 128, 64, min_waves=1.0) and big.spec() == "128x128x64/w1"
    assert big.shared_bytes(CONFIG) == 36864 + 8192 == 45056
    order = (big, *TILE_ORDER)
    assert choose_matrix_tile(512, 256, 320, CONFIG, 49152, order, wave=8) == big  # 4 x 2 workgroups
    assert choose_matrix_tile(512, 256, 320, CONFIG, 49152, order, wave=8, batch=2) == big
    # 2 x 2 big tiles under a wave of 8: the 64-row tile, 64 deep (its grid, 4 x 2, is at most a wave)
    assert choose_matrix_tile(256, 256, 320, CONFIG, 49152, order, wave=8) == MatrixTile(64, 128, 64)
    assert choose_matrix_tile(512, 256, 320, CONFIG, 32768, order, wave=4) == MatrixTile(64, 128, 32)
    assert MatrixTile.parse("128x128x64").min_waves == 0 and MatrixTile.parse("64x64x32/2x2/r2/w0.5").min_waves == 0.5


@I.ir_module
class Layers:
    @R.function
    def conv(
        x: R.Tensor((2, 16, 8, 64), "float16"),
        w: R.Tensor((128, 3, 3, 64), "float16"),
        b: R.Tensor((128,), "float16"),
        res: R.Tensor((2, 16, 8, 128), "float16"),
    ) -> R.Tensor((2, 16, 8, 128), "float16"):
        with R.dataflow():
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1], data_layout="NHWC", kernel_layout="OHWI", out_dtype="float32")
            z = R.astype(R.add(y, R.astype(b, "float32")), "float16")
            out = R.add(z, res)
            R.output(out)
        return out

    @R.function
    def linear(t: R.Tensor((2, 128, 64), "float16"), lw: R.Tensor((96, 64), "float16")) -> R.Tensor(
        (2, 128, 96), "float16"
    ):
        with R.dataflow():
            out = R.astype(R.matmul(t, R.permute_dims(lw), out_dtype="float32"), "float16")
            R.output(out)
        return out

    @R.function
    def text_proj(e: R.Tensor((2, 77, 64), "float16"), pw: R.Tensor((96, 64), "float16")) -> R.Tensor(
        (2, 77, 96), "float16"
    ):
        with R.dataflow():
            out = R.astype(R.matmul(e, R.permute_dims(pw), out_dtype="float32"), "float16")
            R.output(out)
        return out


def _compile(
    mod: tvm.IRModule, tiles: tuple[MatrixTile, ...] = TILE_ORDER, shared: int | None = None
) -> tuple[relax.VMExecutable, dict[str, str]]:
    from webgpu_node import WEBGPU

    options = mp.PipelineOptions(
        dtype="float16",
        conv_layout="NHWC",
        webgpu_matrix=CONFIG,
        webgpu_matrix_tiles=tiles,
        webgpu_matrix_shared=shared,
    )
    with WEBGPU:
        lowered = mp.pipeline(WEBGPU, options)(mod)
    exe = tvm.compile(lowered, WEBGPU, relax_pipeline=None, tir_pipeline=mp.tir_pipeline(WEBGPU, options))
    plans = {str(k): str(v) for k, v in lowered.attrs[PLANS_ATTR].items()}
    return exe, plans


def test_kernels_declare_tvms_bindings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each kernel replaces TVM's shader of the function: the same storage bindings (TVM's names, read or
    read_write), its entry point, its own grid (N / cols x batch * M / rows) and 256 invocations; Dawn
    compiles them."""
    monkeypatch.setenv("MLCWEB_WGSL_CHECK", "require")
    exe, plans = _compile(Layers)
    sources = wgsl_sources(exe.mod)
    kernels = matrix_kernels(plans, sources, CONFIG)
    assert len(kernels) == 3
    assert check_matrix_wgsl({k.name: k.code for k in kernels.values()}) == 3  # Dawn's null backend
    for name, kernel in kernels.items():
        tvm_bindings = [line for line in sources[name].splitlines() if "var<storage" in line]
        assert tvm_bindings and all(line in kernel.code for line in tvm_bindings)
        assert f"fn {name}(" in kernel.code and "@workgroup_size(256, 1, 1)" in kernel.code
        assert "subgroupMatrixMultiplyAccumulate" in kernel.code
    # conv: 256 rows (2 x 16 x 8 pixels) x 128 channels on 64 x 128 tiles; linear: 256 x 96 on 64 x 32;
    # text_proj: 154 rows x 96 on 64 x 32, the third row tile partial
    assert sorted(k.grid for k in kernels.values()) == [(1, 4, 1), (3, 3, 1), (3, 4, 1)]


def test_workgroup_memory_option_reaches_the_plans() -> None:
    """``PipelineOptions.webgpu_matrix_shared`` sets the workgroup memory the plans may use instead of the
    target's 32 KiB: the convolution (256 x 128) takes the 44 KiB 128x128 tile only when it is given."""
    big = (MatrixTile(128, 128, 64), *TILE_ORDER)
    tile = {name: json.loads(plan)["tile"] for name, plan in _compile(Layers, big, 49152)[1].items()}
    conv = next(t for name, t in tile.items() if "conv" in name)
    assert (conv["rows"], conv["cols"], conv["depth"]) == (128, 128, 64)
    tile = {name: json.loads(plan)["tile"] for name, plan in _compile(Layers, big)[1].items()}
    assert next(t for name, t in tile.items() if "conv" in name)["rows"] == 64


# the convolution on 4 subgroups with the epilogue's scratch in two turns, the linears (96 columns, which
# 64x64 tiles do not divide) on the default tiles; every GEMM here makes less than a wave of workgroups,
# so all walk 64 deep
TILES = (MatrixTile(64, 64, 32, (2, 2), 2), *TILE_ORDER)
LAYOUTS = ["// 64x32 tiles 64 deep on 4x2 subgroups (emulated by lanes)"] * 2 + [
    "// 64x64 tiles 64 deep on 2x2 subgroups (emulated by lanes)"
]
# the convolution on 128x128 tiles (two result matrices of rows a subgroup), 32 deep: 64 deep needs more
# than lavapipe's 32 KiB of workgroup memory
BIG_TILES = (MatrixTile(128, 128, 32), *TILE_ORDER)
BIG_LAYOUTS = ["// 128x128 tiles 32 deep on 4x2 subgroups (emulated by lanes)", *LAYOUTS[:2]]


def test_prefetch_reads_the_next_slice_during_the_products(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``PREFETCH`` (the default) each lane's copies of the first slice are read into registers before
    the loop; in the loop they are stored between the two barriers and the next slice's read (where there
    is one: the convolution's 576-deep reduction in 64-deep slices) before the products. Without it, each
    copy is read and stored between the barriers, as before."""
    monkeypatch.setattr(matrix_gemm, "PREFETCH", True)
    exe, plans = _compile(Layers)
    assert all(json.loads(plan)["prefetch"] for plan in plans.values())
    conv = next(k for name, k in matrix_kernels(plans, wgsl_sources(exe.mod), CONFIG).items() if "conv" in name)
    loop = conv.code[conv.code.index("for (var k0") :]
    # 64 x 128 tile, 64 deep, 256 lanes: 4 copies of A and 8 of B a lane, 4 halves each
    assert conv.code.count("  var mlcweb_p") == 12 and "var mlcweb_p11 = mlcweb_b(gemm_s, col0" in conv.code
    stored, guard = loop.index("= mlcweb_p11.w;"), loop.index("if (k0 + 64i < 576i)")
    second_barrier = loop.index("workgroupBarrier();", stored)
    assert loop.index("workgroupBarrier();") < stored < second_barrier < guard
    assert guard < loop.index("mlcweb_p11 = mlcweb_b(gemm_s, col0") < loop.index("subgroupMatrixMultiplyAccumulate")
    assert "let k1 = k0 + 64i;" in loop[guard:]
    monkeypatch.setattr(matrix_gemm, "PREFETCH", False)
    exe, plans = _compile(Layers)
    conv = next(k for name, k in matrix_kernels(plans, wgsl_sources(exe.mod), CONFIG).items() if "conv" in name)
    assert "mlcweb_p" not in conv.code and "let v = mlcweb_a(gemm_s, row0" in conv.code


@pytest.mark.skipif(not Path("/usr/share/vulkan/icd.d/lvp_icd.json").is_file(), reason="needs Mesa's lavapipe")
@pytest.mark.parametrize(
    ("tiles", "layouts", "prefetch"),
    [(TILES, LAYOUTS, True), (BIG_TILES, BIG_LAYOUTS, True), (TILES, LAYOUTS, False)],
    ids=["64-rows", "128x128", "64-rows-no-prefetch"],
)
def test_emulated_kernels_compute_the_layer(
    tiles: tuple[MatrixTile, ...], layouts: list[str], prefetch: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The generated kernels, matrix operations done by lanes, installed in place of TVM's shaders as the
    page installs them: numpy's result on lavapipe, within float16 rounding (1e-2 of the output's scale),
    with the operands read a slice ahead (``PREFETCH``, the default) and without."""
    from webgpu_node import LAVAPIPE, run_on_webgpu

    monkeypatch.setattr(matrix_gemm, "PREFETCH", prefetch)
    exe, plans = _compile(Layers, tiles)
    kernels = matrix_kernels(plans, wgsl_sources(exe.mod), CONFIG, emulate=True)
    assert len(kernels) == 3
    written = sorted(next(line for line in k.code.splitlines() if " tiles " in line) for k in kernels.values())
    assert written == sorted(layouts)
    table = json.loads(json.dumps({k.name: {"code": k.code, "grid": list(k.grid)} for k in kernels.values()}))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 8, 64)).astype(np.float16)
    w = (rng.standard_normal((128, 3, 3, 64)) / 24).astype(np.float16)
    b = rng.standard_normal(128).astype(np.float16)
    res = rng.standard_normal((2, 16, 8, 128)).astype(np.float16)
    got = run_on_webgpu(exe, "conv", [x, w, b, res], icd=LAVAPIPE, matrix=table).astype(np.float32)
    padded = np.pad(x.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = sum(
        np.einsum("nhwc,fc->nhwf", padded[:, i : i + 16, j : j + 8], w[:, i, j].astype(np.float32))
        for i in range(3)
        for j in range(3)
    )
    want = (conv + b.astype(np.float32)).astype(np.float16).astype(np.float32) + res.astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * float(np.abs(want).max()))
    t = rng.standard_normal((2, 128, 64)).astype(np.float16)
    lw = (rng.standard_normal((96, 64)) / 8).astype(np.float16)
    got = run_on_webgpu(exe, "linear", [t, lw], icd=LAVAPIPE, matrix=table).astype(np.float32)
    want = t.astype(np.float32) @ lw.astype(np.float32).T
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * float(np.abs(want).max()))
    e = rng.standard_normal((2, 77, 64)).astype(np.float16)  # 154 rows: a partial row tile
    got = run_on_webgpu(exe, "text_proj", [e, lw], icd=LAVAPIPE, matrix=table).astype(np.float32)
    want = e.astype(np.float32) @ lw.astype(np.float32).T
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * float(np.abs(want).max()))

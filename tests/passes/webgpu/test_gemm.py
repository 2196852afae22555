"""WebGPUMatmul: GEMMs and NCHW convolutions in large WebGPU tiles whose WGSL Dawn accepts.

The numbers are checked end to end by tests/web/test_browser.py: the tiny SD model's page (its GEMMs and
convolutions on this rule, on SwiftShader) gives the image the native build gives.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp
from mlcweb.wgsl_check import check_wgsl, wgsl_sources
from mlcweb_passes.webgpu.gemm import (
    DEEP_STEP_K,
    LARGE,
    MEDIUM,
    SMALL,
    TALL,
    TILE_TABLE_FILE,
    WIDE,
    GemmShape,
    WebGPUMatmul,
    WebGPUTile,
    choose_webgpu_tile,
    gemm_shape,
    read_tile_table,
    tile_candidates,
    write_tile_table,
)

WEBGPU = tvm.target.Target({"kind": "webgpu"}, host={"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"})


@I.ir_module
class Layers:
    @R.function
    def main(
        x: R.Tensor((256, 128), "float32"),
        w: R.Tensor((128, 192), "float32"),
        img: R.Tensor((1, 32, 16, 16), "float32"),
        k: R.Tensor((64, 32, 3, 3), "float32"),
    ) -> R.Tuple(R.Tensor((256, 192), "float32"), R.Tensor((1, 64, 16, 16), "float32")):
        with R.dataflow():
            y = R.matmul(x, w)  # a [K, N] weight: the copy walks N
            z = R.nn.conv2d(img, k, padding=[1, 1, 1, 1])  # NCHW: the input's copy walks the pixels
            out = (y, z)
            R.output(out)
        return out


def _fused(mod: tvm.IRModule) -> tvm.IRModule:
    with WEBGPU:
        return mp.FuseOperators()(mod)


@pytest.mark.parametrize("name", ["matmul", "conv2d"])
def test_the_rule_tiles_gemms_and_convolutions(name: str) -> None:
    fused = _fused(Layers)
    func = next(f for gv, f in fused.functions_items() if gv.name_hint.startswith(name))
    sch = WebGPUMatmul().apply(func, WEBGPU, False)
    assert sch is not None
    script = sch.mod.script()
    assert 'thread="threadIdx.x"' in script and 'scope="shared"' in script and "vthread" in script
    assert WebGPUMatmul().apply(func, tvm.target.Target("llvm"), False) is None  # WebGPU only


def test_tile_choice_follows_the_work() -> None:
    shared = int(WEBGPU.attrs["max_shared_memory_per_block"])  # 32 KiB, what the page asks the adapter for
    assert choose_webgpu_tile(2, 4096, 1280, 256, shared) == LARGE  # enough 128x128 workgroups
    assert choose_webgpu_tile(2, 4096, 1280, 256, 16384) == MEDIUM  # WebGPU's default 16 KiB
    assert choose_webgpu_tile(2, 4096, 1280, 256, 16384, dtype_bytes=2) == LARGE  # float16 tiles: 10 KiB
    # 32-deep steps where both tiles still fit and the reduction pads no further than with 16
    deep = choose_webgpu_tile(2, 4096, 1280, 256, shared, dtype_bytes=2, k=320)
    assert (deep.tile_i, deep.tile_j, deep.step_k) == (128, 128, DEEP_STEP_K)  # float16: 18 KiB of 32
    assert choose_webgpu_tile(2, 4096, 1280, 256, shared, dtype_bytes=4, k=320) == LARGE  # float32: 36 KiB
    assert choose_webgpu_tile(2, 4096, 1280, 256, 16384, dtype_bytes=2, k=320) == LARGE  # a 16 KiB adapter
    assert choose_webgpu_tile(16, 4096, 4096, 256, shared, dtype_bytes=2, k=40) == LARGE  # 40 -> 48, not 64
    assert choose_webgpu_tile(1, 512, 320, 256, shared, dtype_bytes=2, k=2880).step_k == DEEP_STEP_K  # 64x64
    assert choose_webgpu_tile(1, 512, 320, 256, shared, dtype_bytes=4, k=2880) == MEDIUM  # float32: measured slower
    assert choose_webgpu_tile(1, 512, 320, 256, shared) == MEDIUM
    assert choose_webgpu_tile(1, 32, 64, 256, shared) == SMALL
    assert choose_webgpu_tile(2, 4096, 1280, 128, shared) == SMALL  # an adapter of 128 threads


@pytest.mark.parametrize("tile", [LARGE, MEDIUM, SMALL], ids=["large", "medium", "small"])
@pytest.mark.parametrize("dtype_bytes", [2, 4])
def test_register_reads_take_one_bank_each(tile: WebGPUTile, dtype_bytes: int) -> None:
    """Each step a thread reads one ``vector_k``-wide piece of a row of each operand tile; the threads of
    a memory phase (128 bytes: 16 threads of 8-byte float16 pieces, 8 of 16-byte float32 ones) read
    different rows along ``threadIdx.x`` and must hit different banks (32 of 4 bytes). With a thread's
    outputs in adjacent pairs (the old ``virtual = micro / 2``), rows 2 apart made every read 2-way."""
    piece = tile.vector_k * dtype_bytes
    pitch_words = (tile.step_k + tile.row_pad) * dtype_bytes // 4
    adjacent = tile.micro_j // tile.virtual_j
    phase = min(tile.threads_j, 128 // piece)
    banks = [
        (t * adjacent * pitch_words + w) % 32 for t in range(phase) for w in range(piece // 4)
    ]  # the words each thread's first read covers
    assert len(set(banks)) == len(banks)
    old = dataclasses.replace(tile, virtual_j=tile.micro_j // 2)
    old_rows = [t * (old.micro_j // old.virtual_j) * pitch_words % 32 for t in range(phase)]
    assert len(set(old_rows)) < phase


def test_the_pipeline_uses_it_and_dawn_accepts_every_shader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLCWEB_WGSL_CHECK", "require")
    exe = tvm.compile(Layers, WEBGPU, relax_pipeline=mp.pipeline(WEBGPU))
    sources = wgsl_sources(exe.mod)
    gemms = [code for name, code in sources.items() if "matmul" in name or "conv2d" in name]
    assert len(gemms) == 2 and all("@workgroup_size(16, 16, 1)" in code for code in gemms)
    assert check_wgsl(exe.mod) == len(sources)


def _gemm_module(kind: str, x: tuple[int, ...], w: tuple[int, ...], layout: str) -> tvm.IRModule:
    from tvm import relax

    bb = relax.BlockBuilder()
    xv, wv = relax.Var("x", relax.TensorType(x, "float32")), relax.Var("w", relax.TensorType(w, "float32"))
    with bb.function("main", [xv, wv]):
        with bb.dataflow():
            if kind == "conv":
                y = relax.op.nn.conv2d(xv, wv, padding=[1, 1, 1, 1], data_layout=layout)
            elif kind == "linear":  # a torch linear: the weight [N, K] transposed
                y = relax.op.matmul(xv, relax.op.permute_dims(wv))
            else:
                y = relax.op.matmul(xv, wv)
            out = bb.emit_output(bb.emit(y))
        bb.emit_func_output(out)
    return bb.get()


def _reference(kind: str, x: np.ndarray, w: np.ndarray, layout: str) -> np.ndarray:
    import torch

    if kind == "conv":
        tx = torch.from_numpy(x if layout == "NCHW" else x.transpose(0, 3, 1, 2).copy())
        y = torch.nn.functional.conv2d(tx, torch.from_numpy(w), padding=1).numpy()
        return y if layout == "NCHW" else y.transpose(0, 2, 3, 1)
    return x @ (w.T if kind == "linear" else w)


CASES = [
    ("conv", (2, 32, 16, 16), (64, 32, 3, 3), "NCHW"),  # the input's copy walks the pixels
    ("conv", (2, 16, 16, 32), (64, 32, 3, 3), "NHWC"),  # both copies 4-wide along K
    ("conv", (1, 16, 16, 5), (40, 5, 3, 3), "NHWC"),  # K = 45: 4-wide reads across kernel positions
    ("linear", (2, 100, 64), (96, 64), "-"),  # rows not a whole tile
    ("matmul", (4, 128, 40), (4, 40, 72), "-"),  # K = 40 padded to 48, a [K, N] operand
]


def _run_gemm(kind: str, x: tuple[int, ...], w: tuple[int, ...], layout: str) -> tuple[np.ndarray, np.ndarray]:
    """(WebGPU's result on Dawn/SwiftShader, PyTorch's) for one GEMM through the whole pipeline."""
    from webgpu_node import WEBGPU as NODE_TARGET
    from webgpu_node import run_on_webgpu

    rng = np.random.default_rng(0)
    xa = rng.standard_normal(x).astype(np.float32)
    wa = (rng.standard_normal(w) / np.sqrt(np.prod(w[1:]))).astype(np.float32)
    mod = _gemm_module(kind, x, w, layout if layout != "-" else "NCHW")
    if kind == "conv" and layout == "NHWC":
        from tvm import relax

        # keep the given layout: the pipeline's ConvLayout would otherwise add transposes of its own
        mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OIHW"]})(mod)
    options = mp.PipelineOptions(conv_layout="NHWC")  # and vector loads, as builds compile
    relax_pipeline, tir_pipeline = mp.pipeline(NODE_TARGET, options), mp.tir_pipeline(NODE_TARGET, options)
    exe = tvm.compile(mod, NODE_TARGET, relax_pipeline=relax_pipeline, tir_pipeline=tir_pipeline)
    kernels = [n for n in wgsl_sources(exe.mod) if "matmul" in n or "conv2d" in n]
    assert kernels, "no GEMM kernel"
    return run_on_webgpu(exe, "main", [xa, wa]), _reference(kind, xa, wa, layout)


@pytest.mark.parametrize(("kind", "x", "w", "layout"), CASES)
def test_tiles_compute_the_gemm_on_webgpu(kind: str, x: tuple[int, ...], w: tuple[int, ...], layout: str) -> None:
    """WebGPUMatmul's kernels (4-wide register reads along K, vector copies where K is contiguous) give
    numpy's/PyTorch's result on Dawn (SwiftShader), float32: within 1e-5 relative to the output's scale."""
    got, want = _run_gemm(kind, x, w, layout)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_deep_steps_compute_the_gemm_on_webgpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 32-deep reduction steps the library takes for float16 operands, forced here on the 64x64 tile
    with float32 operands (SwiftShader has no float16; float32 128x128 tiles would take 36 KiB of
    workgroup memory), copies 4-wide along K (NHWC, K = 288): PyTorch's result, as above."""
    from mlcweb_passes.webgpu import gemm

    tile = dataclasses.replace(MEDIUM, step_k=DEEP_STEP_K)
    monkeypatch.setattr(gemm, "choose_webgpu_tile", lambda *_: tile)
    got, want = _run_gemm(*CASES[1])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize(
    ("kind", "x", "w", "layout", "size"),
    [(*CASES[1], "large"), (*CASES[4], "medium")],  # one SwiftShader run each (about 40 s)
)
def test_prefetched_tiles_compute_the_gemm_on_webgpu(
    kind: str, x: tuple[int, ...], w: tuple[int, ...], layout: str, size: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``prefetch`` (each thread's next tile loads issued before this tile's multiply-adds, through
    registers), in the 128x128 tile (forced here; it needs large GEMMs otherwise) and the 64x64 one, copies
    along K (NHWC) and along the columns (a [K, N] weight): PyTorch's result, as above."""
    from mlcweb_passes.webgpu import gemm

    tile = dataclasses.replace(LARGE if size == "large" else MEDIUM, prefetch=True)
    monkeypatch.setattr(gemm, "choose_webgpu_tile", lambda *_: tile)
    got, want = _run_gemm(kind, x, w, layout)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_prefetched_tiles_load_through_registers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefetch schedule: a software pipeline over the reduction steps, whose register stage folds
    onto each thread's own run of the tile (4 elements of a 64x16 operand tile for 256 threads), so
    WGSL indexes the registers with constants instead of holding a tile-sized private array."""
    from mlcweb_passes.webgpu import gemm

    fused = _fused(Layers)
    func = next(f for gv, f in fused.functions_items() if gv.name_hint.startswith("conv2d"))
    tile = dataclasses.replace(MEDIUM, prefetch=True)
    sch = WebGPUMatmul(tile=tile).apply(func, WEBGPU, False)
    assert sch is not None and "software_pipeline_stage" in sch.mod.script()
    monkeypatch.setattr(gemm, "choose_webgpu_tile", lambda *_: tile)
    exe = tvm.compile(Layers, WEBGPU, relax_pipeline=mp.pipeline(WEBGPU))
    code = next(c for name, c in wgsl_sources(exe.mod).items() if "conv2d" in name)
    lines = [line.strip() for line in code.splitlines()]
    registers = [
        line for line in lines if line.startswith("var ") and "_reindex_local :" in line and "conv2d" not in line
    ]
    # the pipeline's NHWC layout: each operand's run is one vec4 along K
    assert registers and all(r.endswith("array<vec4<f32>, 1>;") for r in registers), registers


# ------------------------------------------------------------------------------------ tile tables


def _gemm_funcs() -> dict[str, tvm.tirx.PrimFunc]:
    fused = _fused(Layers)
    return {name: next(f for gv, f in fused.functions_items() if gv.name_hint.startswith(name)) for name in CONV_MM}


CONV_MM = ("matmul", "conv2d")


def test_gemm_shapes_name_extents_width_and_contiguous_axes() -> None:
    """The tile table's key: x [256, 128] @ w [128, 192] reads A along K and B along its columns; the NCHW
    convolution (64 outputs of 32 x 3 x 3 over 16 x 16 pixels) reads its input (A) along the pixels and
    its weight along K."""
    shapes = {name: gemm_shape(func) for name, func in _gemm_funcs().items()}
    assert shapes["matmul"] == GemmShape(32, 1, 256, 192, 128, ("k", "mn"))
    assert shapes["matmul"].key == "32bit 1x256x192x128 k/mn"
    assert shapes["conv2d"] == GemmShape(32, 1, 256, 64, 288, ("mn", "k"))  # pixels x outputs x (32 x 3 x 3)
    assert shapes["matmul"].flops == 2 * 256 * 192 * 128


def test_tile_candidates_start_with_the_rules_choice_and_fit() -> None:
    shape = GemmShape(16, 1, 8192, 320, 5760, ("k", "k"))
    found = tile_candidates(shape, 256, 32768)
    assert found[0] == choose_webgpu_tile(1, 8192, 320, 256, 32768, 2, 5760)
    assert len(set(found)) == len(found) and all(t.fits(256, 32768, 2) for t in found)
    assert {(t.tile_i, t.tile_j) for t in found} == {(128, 128), (128, 64), (64, 128), (64, 64), (32, 64)}
    assert {t.step_k for t in found} == {16, DEEP_STEP_K}
    # float32 128x128 tiles with 32-deep steps would take 36 KiB; a 60-row GEMM gets no 128-row tile (half padding)
    assert all(
        t.shared_bytes(4) <= 32768 for t in tile_candidates(GemmShape(32, 1, 8192, 320, 5760, ("k", "k")), 256, 32768)
    )
    assert all(t.tile_i <= 64 for t in tile_candidates(GemmShape(32, 1, 60, 768, 768, ("k", "k")), 256, 32768))
    # K = 40: 32-deep steps would pad it to 64 (16-deep: 48), so none
    assert {t.step_k for t in tile_candidates(GemmShape(16, 16, 4096, 4096, 40, ("k", "k")), 256, 32768)} == {16}


def test_tile_tables_round_trip_and_bad_ones_are_named(tmp_path: Path) -> None:
    path = tmp_path / TILE_TABLE_FILE
    write_tile_table(
        path, {"16bit 1x8192x320x5760 k/k": WIDE}, {"measured_on": "a GPU"}, {"16bit 1x8192x320x5760 k/k": {"ms": 1.0}}
    )
    assert read_tile_table(path) == {"16bit 1x8192x320x5760 k/k": WIDE}
    assert not list(tmp_path.glob("*.tmp-*"))
    bad = tmp_path / "bad.json"
    for text in (
        "{",
        '{"format": "x", "tiles": {}}',
        '{"format": "mlcweb-webgpu-gemm-tiles/1", "tiles": {"k": {"tile": {"micro_i": 3}}}}',
    ):
        bad.write_text(text)
        with pytest.raises(ValueError, match=r"bad\.json"):
            read_tile_table(bad)
    with pytest.raises(ValueError, match="virtual"):
        WebGPUTile(micro_i=4, virtual_i=3)


def _workgroups(options: mp.PipelineOptions) -> dict[str, str]:
    exe = tvm.compile(Layers, WEBGPU, relax_pipeline=mp.pipeline(WEBGPU, options))
    found = {}
    for name, code in wgsl_sources(exe.mod).items():
        kind = next((k for k in CONV_MM if k in name), None)
        if kind:
            found[kind] = next(line for line in code.splitlines() if "@workgroup_size" in line).strip()
    return found


def test_the_pipeline_takes_tiles_from_a_table_or_a_database_directory(tmp_path: Path) -> None:
    """The table's tile for the matmul's shape (32x64: 8x16 threads) and the rule's own for the
    convolution, which the table lacks; the same from a database directory that holds the table; a
    tile the target cannot fit (36 KiB of float32 operands) falls back to the rule's."""
    key = gemm_shape(_gemm_funcs()["matmul"]).key  # type: ignore[union-attr]
    assert _workgroups(mp.PipelineOptions()) == {k: "@compute @workgroup_size(16, 16, 1)" for k in CONV_MM}
    tabled = _workgroups(mp.PipelineOptions(webgpu_tiles={key: SMALL}))
    assert tabled == {"matmul": "@compute @workgroup_size(16, 8, 1)", "conv2d": "@compute @workgroup_size(16, 16, 1)"}
    for name in ("database_workload.json", "database_tuning_record.json"):
        (tmp_path / name).write_text("")
    write_tile_table(tmp_path / TILE_TABLE_FILE, {key: SMALL})
    assert _workgroups(mp.PipelineOptions(database=tmp_path)) == tabled
    too_big = dataclasses.replace(LARGE, step_k=DEEP_STEP_K)
    assert _workgroups(mp.PipelineOptions(webgpu_tiles={key: too_big}))["matmul"].endswith("(16, 16, 1)")


@pytest.mark.parametrize(
    ("case", "tile"),
    [(1, dataclasses.replace(WIDE, step_k=DEEP_STEP_K)), (4, TALL)],
    ids=["128x64-deep-nhwc", "64x128-kn"],
)
def test_tuning_candidates_compute_the_gemm_on_webgpu(
    case: int, tile: WebGPUTile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The candidates only tuning picks (128x64 with 32-deep steps over an NHWC convolution, 64x128 over a
    [K, N] weight) give PyTorch's result on Dawn (SwiftShader), as the rule's own tiles do above."""
    from mlcweb_passes.webgpu import gemm

    monkeypatch.setattr(gemm, "choose_webgpu_tile", lambda *_: tile)
    got, want = _run_gemm(*CASES[case])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))

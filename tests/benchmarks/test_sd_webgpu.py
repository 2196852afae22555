"""benchmarks/sd_webgpu.py's report: the peers table puts the page's library (the subgroup one where the
adapter took it, with its subgroup-matrix kernels where it took those, streamed) beside onnxruntime-web
and the CUDA build of the same session, as mlcweb's time over the peer's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import sd_webgpu


def _run(unet: float, streamed: float) -> dict[str, object]:
    return {
        "ms": {"clip": 1.0, "unet": unet, "vae": 50.0, "image": 2000.0},
        "ms_streamed": {"unet": streamed, "vae": 40.0, "image": 1500.0},
        "steps": 20,
        "finite": {"unet": True},
        "pipeline_creation_s": 4.0,
    }


def test_peers_table_uses_the_page_library_and_states_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "webgpu-sd15-float16.json").write_text(json.dumps(_run(150.0, 120.0)))
    (tmp_path / "webgpu-sd15-float16-subgroups.json").write_text(json.dumps({**_run(140.0, 100.0), "subgroups": 32}))
    (tmp_path / "ort-unet-float16.json").write_text(json.dumps({"ms": 200.0}))
    (tmp_path / "cuda-float16.json").write_text(json.dumps({"dtype": "float16", "ms": {"unet": 10.0, "vae": 8.0}}))
    assert sd_webgpu.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| unet float16 | 140.0 | 100.0 | 200.0 | 10.00 | 0.70x / 0.50x | 10.0x |" in out
    assert "| vae float16 | 50.0 | 40.0 | - | 8.00 | - | 5.0x |" in out
    # with the subgroup-matrix kernels the adapter offers, the page runs the subgroup library with them
    (tmp_path / "webgpu-sd15-float16-matrix.json").write_text(json.dumps({**_run(60.0, 55.0), "matrix_kernels": 9}))
    both = {**_run(50.0, 45.0), "subgroups": 32, "matrix_kernels": 9}
    (tmp_path / "webgpu-sd15-float16-subgroups-matrix.json").write_text(json.dumps(both))
    assert sd_webgpu.main(["report", str(tmp_path)]) == 0
    assert "| unet float16 | 50.0 | 45.0 | 200.0 | 10.00 | 0.25x / 0.23x | 4.5x |" in capsys.readouterr().out


def test_js_side_table_for_runs_that_reused_bindings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Runs made with ``--cache-bindings`` get a row of the JS-side table: GPU time, streamed wall time and
    JS encoding of a UNet step with tvmjs's bindings as they are and reused, and the image both ways."""
    cached = {
        **_run(70.0, 40.9),
        "encode_ms": {"unet": 33.5},
        "ms_cached_bindings": {"unet": 29.7, "vae": 26.2, "image": 660.0},
        "encode_ms_cached_bindings": {"unet": 20.0},
        "profile": {"unet": {"total_ms": 31.7, "dispatches": 534, "kernels": 185, "top": []}},
    }
    (tmp_path / "webgpu-sd15-float16-matrix.json").write_text(json.dumps({**cached, "matrix_kernels": 9}))
    (tmp_path / "webgpu-sd15-float16.json").write_text(json.dumps(_run(150.0, 120.0)))
    assert sd_webgpu.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| sd15-float16-matrix | 31.70 | 40.9 | 33.5 | 29.7 | 20.0 | 1.500 | 0.660 |" in out
    table = out[out.index("| build | UNet GPU") :].split("\n\n")[0]
    assert len(table.splitlines()) == 3  # header, rule, the one run that timed it


def test_tile_changes_name_fields_of_each_tile() -> None:
    """The benchmarks' tile knob: an integer for every tile, or a field (or half of it) of each tile, as the
    pairs layout the library had before (``virtual = micro / 2``) is rebuilt; restored afterwards."""
    import webgpu_kernels

    from mlcweb_passes.webgpu import gemm

    assert webgpu_kernels.tile_change("virtual_j=half_micro_j", gemm.LARGE) == ("virtual_j", "half_micro_j")
    assert webgpu_kernels.tile_change("prefetch=1", gemm.LARGE) == ("prefetch", True)
    before = (gemm.LARGE, gemm.MEDIUM, gemm.SMALL)
    with webgpu_kernels._tiles(gemm, {"virtual_j": "half_micro_j", "step_k": 32}):
        assert (gemm.LARGE.virtual_j, gemm.MEDIUM.virtual_j, gemm.LARGE.step_k) == (4, 2, 32)
    assert before == (gemm.LARGE, gemm.MEDIUM, gemm.SMALL)


def test_matrix_variants_write_the_kernels_the_page_would_install() -> None:
    """webgpu_kernels.py's subgroup-matrix variants: the library plus the table of its kernels on subgroup
    matrices, the attention written with the variant's layouts first (2 subgroups: 32 query rows a
    workgroup), the library's own layouts restored afterwards."""
    import webgpu_kernels

    from mlcweb_passes.webgpu import matrix_attention

    before = matrix_attention.LAYOUTS
    shapes = {"attention": webgpu_kernels.TINY["attention"]}  # 96 queries, 77 keys, 2 heads of 40
    module = webgpu_kernels._module("float16", shapes)
    options = webgpu_kernels._options("matrix-attn-2x16")
    layouts = webgpu_kernels.MATRIX_VARIANTS["matrix-attn-2x16"]
    _, table = webgpu_kernels._compile_matrix(module, webgpu_kernels._target(), options, layouts, "matrix-attn-2x16")
    assert list(table) == ["flash_attention_kernel"]
    assert table["flash_attention_kernel"]["grid"] == [3, 2, 1]
    assert "2 subgroups of 16 rows, 16 keys a step, K/V read a step ahead" in table["flash_attention_kernel"]["code"]
    assert before == matrix_attention.LAYOUTS


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--split-policy", "64x128,2", "is not ROWSxCOLS,WAVES,MIN_SLICE"),
        ("--split-policy", "64x0,2,1152", "positive tile edges"),
        ("--matrix-tiles", "64x128x32,64x1", "is not ROWSxCOLSxDEPTH"),
        ("--matrix-tuned", "no-such-table.json", "cannot read the WebGPU matrix tile table"),
    ],
)
def test_build_options_are_checked_before_building(
    option: str, value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad ``--split-policy``, ``--matrix-tiles`` or ``--matrix-tuned`` is one argparse line and exit
    code 2, before any build starts; good ones parse into the pass library's types."""
    with pytest.raises(SystemExit) as exit_info:
        sd_webgpu.main(["build", "--out", str(tmp_path), option, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    policy = sd_webgpu.split_policy_arg("64x128,2,1152")
    assert (policy.tile, policy.waves, policy.min_slice) == ((64, 128), 2.0, 1152)
    assert [t.spec() for t in sd_webgpu.matrix_tiles_arg("64x128x32,128x160x32")] == ["64x128x32", "128x160x32"]

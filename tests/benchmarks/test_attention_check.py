"""benchmarks/webgpu/attention_check.mjs, the known-answer check of written flash-attention kernels that
``webgpu_kernels.py check`` runs on the GPU: here on lavapipe, with the kernel's matrix operations done by
the lanes (``emulate=True``), reading merged projections as the kernel's helpers say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tvm
from attention_fixtures import CONFIG, LAVAPIPE_ICD, attention_module, attention_plans

from mlcweb.wgsl_check import wgsl_sources
from mlcweb_passes.cuda.flash_kernel import AttentionShape
from mlcweb_passes.webgpu.matrix_attention import attention_kernels

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from webgpu_kernels import matrix_tables  # noqa: E402


@pytest.mark.skipif(not LAVAPIPE_ICD.is_file(), reason="needs Mesa's lavapipe")
def test_the_check_passes_a_right_kernel_and_flags_a_wrong_one(tmp_path: Path) -> None:
    """The kernel over merged Q/K/V projections (70 queries and keys, 2 heads of 24) matches the float64
    reference to float16 rounding; the same kernel with its output halved is reported off."""
    from webgpu_node import WEBGPU

    mod = attention_module(AttentionShape(2, 70, 70, 2, 24), ((3, 0), (3, 1), (3, 2)))
    kernel = attention_kernels(attention_plans(mod, 24000), wgsl_sources(tvm.compile(mod, WEBGPU).mod), CONFIG, True)
    code = kernel["flash_attention_kernel"].code
    halved = code.replace("flash_attention_kernel", "halved_kernel").replace("] / l);", "] / (2.0f * l));")
    assert halved.count("2.0f * l") == 12  # every output store: 24 columns, two lanes a row
    grid = list(kernel["flash_attention_kernel"].grid)
    table = {"flash_attention_kernel": {"code": code, "grid": grid}, "halved_kernel": {"code": halved, "grid": grid}}
    (tmp_path / "matrix.json").write_text(json.dumps(table))
    out = tmp_path / "check.json"
    cmd = ["node", str(ROOT / "benchmarks" / "webgpu" / "attention_check.mjs")]
    cmd += ["--dawn", str(ROOT / "web" / "node_modules" / "webgpu"), "--tables", str(tmp_path / "matrix.json")]
    cmd += ["--rows", "12", "--out", str(out)]
    env = {**os.environ, "VK_ICD_FILENAMES": str(LAVAPIPE_ICD), "XDG_RUNTIME_DIR": str(tmp_path)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {name.split(":")[-1]: r for name, r in json.loads(out.read_text()).items()}
    assert results["flash_attention_kernel"]["shape"] == [2, 70, 70, 2, 24]
    assert results["flash_attention_kernel"]["rel_rms"] < 1e-3
    assert results["halved_kernel"]["rel_rms"] == pytest.approx(0.5, abs=0.01)
    assert not out.with_name("check.json.tmp").exists()  # written aside after each table, then renamed


def test_check_takes_every_matrix_table_or_the_named_builds(tmp_path: Path) -> None:
    """``webgpu_kernels.py check`` reads each kernel build's ``matrix.json`` and each model build's
    ``*-matrix.json`` and ``*-matrix-<bytes>.json`` (not its other JSON files); ``--only`` keeps the
    builds named by folder."""
    files = ["kernels/a-float16/matrix.json", "kernels/b-float16/matrix.json"]
    files += ["builds/sd15c-float16/x-matrix-49152.json", "builds/sd15c-float16/x-matrix.json"]
    for name in [*files, "builds/sd15c-float16/tensor-cache.json", "kernels/a-float16/specs.json"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    assert matrix_tables(tmp_path) == [tmp_path / f for f in files]
    assert matrix_tables(tmp_path, {"sd15c-float16", "b-float16"}) == [tmp_path / f for f in files[1:]]
    assert matrix_tables(tmp_path, {"nothing"}) == []

import json
from pathlib import Path

import numpy as np
import pytest
import tiny_bert_plugin
import torch

from mlcweb import BuildOptions, MlcwebError
from mlcweb.build import build, build_phases, plan_memory, resolve
from mlcweb.cli import main as cli_main
from mlcweb.errors import CorruptArtifactError, TargetUnavailableError
from mlcweb.plugins import PluginHost
from mlcweb.runtime import load

IDS = np.array([[101, 7, 42, 99, 3, 5, 8, 13, 21, 34, 55, 89, 1, 2, 102, 0]], dtype="int32")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    host = PluginHost([("tiny_bert", tiny_bert_plugin)], entry_points=False)
    out = tmp_path_factory.mktemp("dist") / "tiny-bert-llvm"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLCWEB_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        build(host, "tiny-bert", BuildOptions(target="llvm", out=out), progress=False)
    return out


def test_build_writes_library_weights_assets_and_manifest(built: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    listed = {f["path"] for f in manifest["files"]}
    on_disk = {p.name for p in built.iterdir()} - {"manifest.json"}
    assert listed == on_disk
    assert {"tiny-bert-llvm.so", "tensor-cache.json", "params_shard_0.bin", "bert-config.json"} <= listed
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in manifest["files"])
    assert manifest["model"] == "tiny-bert" and manifest["target"] == "llvm" and manifest["dtype"] == "float32"
    assert manifest["versions"]["apache-tvm"].startswith("0.27")
    assert manifest["functions"]["main"]["inputs"] == [
        {"name": "input_ids", "shape": [1, 16], "dtype": "int32", "range": [0, 127]}  # the plugin's vocabulary
    ]


def test_memory_plan_matches_the_build(
    built: Path, tmp_path: Path, host: PluginHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan (no weights computed) gives the build's planned blocks and each function's weight bytes,
    from a fresh import and from the import cache's graph alone; the build stores less where tensors are
    equal (random models' LayerNorm ones and zeros), so the plan's stored bytes are an upper bound."""
    monkeypatch.setenv("MLCWEB_CACHE_DIR", str(tmp_path / "cache"))
    manifest = json.loads((built / "manifest.json").read_text())
    index = json.loads((built / "tensor-cache.json").read_text())
    nbytes = {r["name"]: r["nbytes"] for shard in index["records"] for r in shard["records"]}
    taken = sum(nbytes[name] for name in manifest["functions"]["main"]["params"])  # a shared tensor per use
    options = BuildOptions(target="llvm", out=tmp_path / "never-written")
    fresh, cached = (plan_memory(host, "tiny-bert", options) for _ in range(2))
    for plan in (fresh, cached):
        assert plan.as_dict()["planned"] == manifest["memory"] and manifest["memory"]["main"]["planned_bytes"] > 0
        assert plan.weight_bytes["main"] == plan.stored_weight_bytes == taken > sum(nbytes.values())
        assert plan.peak_bytes == taken + manifest["memory"]["main"]["planned_bytes"]
    assert not (tmp_path / "never-written").exists()


def test_built_model_matches_pytorch(built: Path) -> None:
    reference = tiny_bert_plugin.reference_model(tiny_bert_plugin.DEFAULT_CONFIG)
    expected = reference(torch.from_numpy(IDS)).detach().numpy()
    got = load(built)("main", IDS).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_float16_build_matches_pytorch_within_tolerance(tmp_path: Path, host: PluginHost) -> None:
    out = tmp_path / "fp16"
    build(host, "tiny-bert", BuildOptions(target="llvm", out=out, dtype="float16"), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    cache = json.loads((out / "tensor-cache.json").read_text())
    dtypes = {r["dtype"] for shard in cache["records"] for r in shard["records"]}
    assert "float16" in dtypes and manifest["dtype"] == "float16"
    reference = tiny_bert_plugin.reference_model(tiny_bert_plugin.DEFAULT_CONFIG)
    expected = reference(torch.from_numpy(IDS)).detach().numpy()
    got = load(out)("main", IDS).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-2)  # layer-normed activations, |x| ~ 1


def test_same_inputs_give_identical_artifacts(built: Path, tmp_path: Path, host: PluginHost) -> None:
    again = tmp_path / "again"
    build(host, "tiny-bert", BuildOptions(target="llvm", out=again, use_cache=False), progress=False)
    assert (again / "manifest.json").read_bytes() == (built / "manifest.json").read_bytes()


def test_second_build_uses_the_import_cache(tmp_path: Path, host: PluginHost) -> None:
    first = build(host, "tiny-bert", BuildOptions(target="llvm", out=tmp_path / "a"), progress=False)
    second = build(host, "tiny-bert", BuildOptions(target="llvm", out=tmp_path / "b"), progress=False)
    assert not first.from_cache and second.from_cache
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


def test_failed_build_leaves_nothing_behind(tmp_path: Path, host: PluginHost) -> None:
    out = tmp_path / "out"

    def die(partial: Path) -> None:
        assert (partial / "manifest.json").is_file()  # everything was written, then the build is killed
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(host, "tiny-bert", BuildOptions(target="llvm", out=out), progress=False, before_rename=die)
    assert list(tmp_path.iterdir()) == []


def test_failed_rebuild_keeps_the_previous_artifacts(built: Path, host: PluginHost) -> None:
    before = (built / "manifest.json").read_bytes()
    with pytest.raises(MlcwebError, match="does not exist"):
        build(
            host, "tiny-bert", BuildOptions(target="llvm", out=built, model_path=Path("/nonexistent")), progress=False
        )
    assert (built / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in built.parent.iterdir()) == [built.name]


def test_corrupt_byte_is_detected_on_load(built: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    shard = copy / "params_shard_0.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=r"params_shard_0\.bin does not match its sha256"):
        load(copy)


def test_unknown_and_unbuildable_targets_are_clear_errors(tmp_path: Path, host: PluginHost) -> None:
    with pytest.raises(TargetUnavailableError, match="unknown target 'tpu'"):
        build(host, "tiny-bert", BuildOptions(target="tpu", out=tmp_path / "x"), progress=False)
    with pytest.raises(TargetUnavailableError, match="cannot build for 'vulkan'"):
        build(host, "tiny-bert", BuildOptions(target="vulkan", out=tmp_path / "x"), progress=False)
    assert not (tmp_path / "x").exists()


def test_conv_layout_is_nhwc_for_cuda_float16_only_and_checked(tmp_path: Path, host: PluginHost, built: Path) -> None:
    def layout(target: str, **kw: object) -> str:
        return resolve(host, "tiny-bert", BuildOptions(target=target, out=tmp_path, **kw), link=False).conv_layout  # type: ignore[arg-type]

    assert layout("cuda", dtype="float16") == "NHWC"
    assert layout("cuda") == "NCHW"  # float32: not measured
    assert layout("llvm", dtype="float16") == "NCHW"
    assert layout("cuda", dtype="float16", conv_layout="NCHW") == "NCHW"
    assert json.loads((built / "manifest.json").read_text())["conv_layout"] == "NCHW"
    with pytest.raises(MlcwebError, match="unknown conv layout 'NCWH'"):
        build(host, "tiny-bert", BuildOptions(target="llvm", out=tmp_path / "x", conv_layout="NCWH"), progress=False)


def test_webgpu_without_its_toolchain_is_a_clear_error(
    tmp_path: Path, host: PluginHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlcweb.web

    # No emcc on PATH: the error names it and how to install it, before any import or compile.
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(TargetUnavailableError, match=r"'webgpu'.*emcc is not on PATH.*apt-get install emscripten"):
        build(host, "tiny-bert", BuildOptions(target="webgpu", out=tmp_path / "w"), progress=False)
    monkeypatch.undo()
    # The npm packages not installed: the error says to run npm ci.
    missing = {**mlcweb.web.WEB_RUNTIME_FILES, "tvmjs.bundle.js": "node_modules/not-installed/index.js"}
    monkeypatch.setattr(mlcweb.web, "WEB_RUNTIME_FILES", missing)
    with pytest.raises(TargetUnavailableError, match=r"not-installed/index\.js.*npm ci"):
        build(host, "tiny-bert", BuildOptions(target="webgpu", out=tmp_path / "w"), progress=False)
    assert not (tmp_path / "w").exists()


def test_cli_run_writes_outputs(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "in.npz", input_ids=IDS)
    assert cli_main(["run", str(built), "--inputs", str(tmp_path / "in.npz"), "--output", str(tmp_path / "o.npz")]) == 0
    assert "output0: float32[1, 16, 32]" in capsys.readouterr().out
    expected = load(built)("main", IDS).numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "o.npz")["output0"], expected)


def test_cli_build_prints_a_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlcweb.plugins

    monkeypatch.setattr(
        mlcweb.plugins,
        "PluginHost",
        lambda: PluginHost([("tiny_bert", tiny_bert_plugin)], entry_points=False),
    )
    out = tmp_path / "cli-out"
    assert cli_main(["build", "tiny-bert", "--target", "llvm", "--out", str(out), "--set", "seed=0"]) == 0
    text = capsys.readouterr().out
    assert f"built tiny-bert for llvm (float32) in {out}" in text
    assert "kernels" in text and "tiny-bert-llvm.so" in text
    assert (out / "manifest.json").is_file()
    assert cli_main(["build", "tiny-bert", "--out", str(tmp_path / "plan"), "--plan-memory"]) == 0
    text = capsys.readouterr().out
    assert "memory plan of tiny-bert for llvm (float32)" in text and "peak" in text
    assert not (tmp_path / "plan").exists()
    assert cli_main(["build", "tiny-bert", "--out", str(out), "--set", "oops"]) == 2


def test_cpu_artifacts_leave_the_cuda_stack_limit_alone(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr("mlcweb.runtime.set_cuda_stack_limit", calls.append)
    load(built, cuda_stack_bytes=128)
    assert calls == []  # only CUDA artifacts set it (sd_bench measures its effect on the H100)


def test_cuda_stack_limit_needs_a_driver_and_a_size() -> None:
    from mlcweb.cuda_limits import set_cuda_stack_limit

    with pytest.raises(ValueError, match="size in bytes"):
        set_cuda_stack_limit(-1)
    assert set_cuda_stack_limit(256) is False  # no GPU here: no driver, or no context to set it on


def test_weight_layout_passes_follow_the_target(host: PluginHost) -> None:
    def names(target: str, arch: str | None = None, **kw: object) -> list[str]:
        opts = BuildOptions(target=target, out=Path("unused"), arch=arch, **kw)  # type: ignore[arg-type]
        phases = build_phases(host, resolve(host, "tiny-bert", opts, link=False))
        return [p.info.name for p in phases["weights"].passes]

    assert names("llvm") == ["mlcweb.FoldLinearReshapes"]
    assert names("llvm", dtype="float16") == ["mlcweb.FoldLinearReshapes", "mlcweb.MixedPrecision"]
    cuda = names("cuda", dtype="float16")
    assert cuda == [
        "mlcweb.FoldLinearReshapes",
        "mlcweb.MixedPrecision",
        "mlcweb.ConvLayout",
        "mlcweb.LinearWeightLayout",
        "mlcweb.SplitKConv",
    ]
    # NHWC asked for on the CPU: the layouts, but no split-K (its tiles are CUDA's)
    cpu_nhwc = names("llvm", dtype="float16", conv_layout="NHWC")
    assert "mlcweb.ConvLayout" in cpu_nhwc and "mlcweb.SplitKConv" not in cpu_nhwc


def test_the_cli_offers_every_target_there_is() -> None:
    """The command line's light list of target names (no TVM import) is the targets module's."""
    from mlcweb.choices import TARGET_NAMES
    from mlcweb.targets import TARGETS

    assert tuple(TARGETS) == TARGET_NAMES


def test_the_cli_offers_every_webgpu_attention_kernel_there_is() -> None:
    """The command line's light list of attention kernels (no TVM import) is the pass library's, and
    builds write the subgroup-matrix kernel unless told otherwise."""
    import mlcweb_passes as mp
    from mlcweb.choices import WEBGPU_ATTENTION

    assert mp.WEBGPU_ATTENTION == WEBGPU_ATTENTION
    assert BuildOptions(target="webgpu", out=Path("web")).webgpu_attention == "matrix"
    assert mp.PipelineOptions().webgpu_attention == "matrix"
    with pytest.raises(ValueError, match="unknown webgpu_attention 'tensor'; choose one of matrix, lanes, portable"):
        mp.PipelineOptions(webgpu_attention="tensor")

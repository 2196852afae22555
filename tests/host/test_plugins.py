import os
import subprocess
import sys
from pathlib import Path

import pytest

import mlcweb_passes as mp
from mlcweb import ModelSpec, hookimpl
from mlcweb.errors import ModelNotFoundError, PluginConflictError
from mlcweb.plugins import PluginHost

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"


def _fake_distribution(root: Path) -> None:
    """An installed distribution whose entry point in the mlcweb group names the tiny BERT plugin."""
    info = root / "mlcweb_tiny_bert-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mlcweb-tiny-bert\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mlcweb]\ntiny_bert = tiny_bert_plugin\n")


def test_plugins_are_discovered_through_entry_points(tmp_path: Path) -> None:
    _fake_distribution(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(PLUGINS), os.getcwd()])}
    result = subprocess.run(
        [sys.executable, "-m", "mlcweb.cli", "list"], env=env, capture_output=True, text=True, check=True
    )
    assert "tiny-bert" in result.stdout
    assert "plugin tiny_bert" in result.stdout


def test_without_the_distribution_the_model_is_unknown(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.getcwd()])}
    code = "from mlcweb.plugins import PluginHost; print(sorted(PluginHost().models))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "tiny-bert" not in result.stdout


class _Impostor:
    @hookimpl
    def mlcweb_models(self) -> list[ModelSpec]:
        return [ModelSpec("tiny-bert", "another model under the same name")]


def test_two_plugins_claiming_one_name_is_an_error_naming_both() -> None:
    import tiny_bert_plugin

    with pytest.raises(
        PluginConflictError, match=r"'tiny-bert' is provided by two plugins: 'tiny_bert' and 'impostor'"
    ):
        PluginHost([("tiny_bert", tiny_bert_plugin), ("impostor", _Impostor())], entry_points=False)


def test_unknown_model_lists_the_known_ones(host: PluginHost) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no installed plugin provides a model named 'gpt'.*tiny-bert"):
        host.model("gpt")


def test_cli_reports_errors_without_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "MLCWEB_CACHE_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "mlcweb.cli", "build", "no-such-model", "--out", str(tmp_path / "o")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "mlcweb: error: no installed plugin provides a model named 'no-such-model'" in result.stderr
    assert "Traceback" not in result.stderr


class _PhaseRecorder:
    """The tiny BERT plugin plus passes in every phase that record what the module looks like there."""

    def __init__(self) -> None:
        import tiny_bert_plugin

        self.bert = tiny_bert_plugin
        self.seen: list[tuple[str, int, int]] = []

    @hookimpl
    def mlcweb_models(self) -> list[ModelSpec]:
        return self.bert.mlcweb_models()

    @hookimpl
    def mlcweb_import_model(self, spec: ModelSpec, options: object) -> object:
        return self.bert.mlcweb_import_model(spec, options)

    @hookimpl
    def mlcweb_phase_passes(self, spec: ModelSpec, phase: str, context: object) -> list[object]:
        import tvm
        from tvm import tirx

        @tvm.transform.module_pass(opt_level=0, name=f"record.{phase}")
        def record(mod: tvm.IRModule, _ctx: object) -> tvm.IRModule:
            funcs = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
            self.seen.append((phase, len(funcs), sum(mp.is_scheduled(f) for f in funcs)))
            return mod

        return [record]


def test_a_plugins_phase_passes_run_in_their_phase(tmp_path: Path) -> None:
    from mlcweb.build import build
    from mlcweb.model import BuildOptions

    recorder = _PhaseRecorder()
    host = PluginHost([("recorder", recorder)], entry_points=False)
    build(host, "tiny-bert", BuildOptions(target="llvm", out=tmp_path / "out", use_cache=False), progress=False)
    assert [phase for phase, _, _ in recorder.seen] == list(mp.PHASES)
    seen = {phase: (funcs, scheduled) for phase, funcs, scheduled in recorder.seen}
    assert seen["weights"] == (0, 0) and seen["graph"] == (0, 0)  # Relax only: nothing legalized yet
    assert seen["fuse"][0] > 0 and seen["fuse"][1] == 0  # fused PrimFuncs, not scheduled
    assert seen["schedule"][0] == seen["schedule"][1] > 0  # every kernel scheduled

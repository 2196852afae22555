import os
import subprocess
import sys
from pathlib import Path

import pytest

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

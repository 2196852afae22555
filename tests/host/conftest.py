import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
sys.path.insert(0, str(PLUGINS))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test module gets its own import cache, never the user's."""
    cache = tmp_path_factory.getbasetemp() / "mlcweb-cache"
    monkeypatch.setenv("MLCWEB_CACHE_DIR", str(cache))
    yield cache


@pytest.fixture
def host() -> object:
    import tiny_bert_plugin

    from mlcweb.plugins import PluginHost

    return PluginHost([("tiny_bert", tiny_bert_plugin)], entry_points=False)

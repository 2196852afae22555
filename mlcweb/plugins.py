"""Plugin discovery (the ``mlcweb`` entry-point group) and the model registry."""

from __future__ import annotations

import hashlib
import inspect
import sys
import types
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pluggy

from . import hookspecs
from .errors import ModelNotFoundError, PluginConflictError
from .model import ImportedModel, ImportOptions, ModelSpec

__all__ = ["ENTRY_POINT_GROUP", "PluginHost", "RegisteredModel", "hookimpl"]

ENTRY_POINT_GROUP = "mlcweb"
hookimpl = pluggy.HookimplMarker("mlcweb")


@dataclass(frozen=True)
class RegisteredModel:
    spec: ModelSpec
    plugin: str


class PluginHost:
    """The plugin manager plus the models the plugins declared.

    ``entry_points=True`` loads every plugin installed under the ``mlcweb`` group; ``plugins`` registers
    more explicitly (tests, scripts), as ``(name, module_or_object)`` pairs.
    """

    def __init__(self, plugins: Iterable[tuple[str, object]] = (), *, entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager("mlcweb")
        self.pm.add_hookspecs(hookspecs)
        if entry_points:
            self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for name, plugin in plugins:
            self.pm.register(plugin, name=name)
        self.models = self._collect_models()

    def _collect_models(self) -> dict[str, RegisteredModel]:
        models: dict[str, RegisteredModel] = {}
        for impl in self.pm.hook.mlcweb_models.get_hookimpls():
            specs = cast("list[ModelSpec]", impl.function() or [])
            for spec in specs:
                if spec.name in models:
                    raise PluginConflictError(
                        f"model {spec.name!r} is provided by two plugins: {models[spec.name].plugin!r} and "
                        f"{impl.plugin_name!r}; uninstall one of them or rename the model in one plugin"
                    )
                models[spec.name] = RegisteredModel(spec, impl.plugin_name)
        return models

    def source_digest(self, plugin: str) -> str:
        """sha256 of the Python sources of the package that holds ``plugin``: part of the import cache
        key, so editing a plugin's model code invalidates the models it imported before."""
        obj = self.pm.get_plugin(plugin)
        module = obj if isinstance(obj, types.ModuleType) else inspect.getmodule(obj)
        if module is None or not getattr(module, "__file__", None):
            return ""
        top = sys.modules.get(module.__name__.split(".")[0], module)
        root = Path(top.__file__ or "").parent if hasattr(top, "__path__") else Path(module.__file__ or "")
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        digest = hashlib.sha256()
        for path in files:
            digest.update(str(path.relative_to(root) if root.is_dir() else path.name).encode())
            digest.update(path.read_bytes())
        return digest.hexdigest()

    def model(self, name: str) -> RegisteredModel:
        if name not in self.models:
            known = ", ".join(sorted(self.models)) or "none (no plugin installed)"
            raise ModelNotFoundError(
                f"no installed plugin provides a model named {name!r}; known models: {known}. "
                "Install the plugin package that provides it (pip install -e examples/<plugin>)"
            )
        return self.models[name]

    def _only(self, hook_name: str, plugin: str) -> pluggy.HookCaller:
        others = [p for n, p in self.pm.list_name_plugin() if n != plugin]
        return self.pm.subset_hook_caller(hook_name, remove_plugins=others)

    def import_model(self, name: str, options: ImportOptions) -> ImportedModel:
        registered = self.model(name)
        imported = self._only("mlcweb_import_model", registered.plugin)(spec=registered.spec, options=options)
        if imported is None:
            raise ModelNotFoundError(
                f"plugin {registered.plugin!r} declares model {name!r} but its mlcweb_import_model returned nothing"
            )
        imported.check()
        return imported

    def phase_passes(self, name: str, *, phase: str, context: object) -> list[Any]:
        """The passes model ``name``'s plugin adds to pipeline ``phase``."""
        registered = self.model(name)
        lists = self._only("mlcweb_phase_passes", registered.plugin)(spec=registered.spec, phase=phase, context=context)
        return [p for passes in lists for p in passes]

    def write_assets(self, name: str, **kwargs: object) -> list[str]:
        registered = self.model(name)
        lists = self._only("mlcweb_write_assets", registered.plugin)(spec=registered.spec, **kwargs)
        return [p for paths in lists for p in paths]

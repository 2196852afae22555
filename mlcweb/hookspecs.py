"""Hook specifications: what a model plugin can implement.

A plugin is a module (or object) with functions marked ``@mlcweb.hookimpl`` and named like the specs
below, registered under the ``mlcweb`` entry-point group::

    [project.entry-points.mlcweb]
    my_model = "my_package.plugin"

See ``docs/plugins.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import tvm

    from .model import BuildOptions, ImportedModel, ImportOptions, ModelSpec

hookspec = pluggy.HookspecMarker("mlcweb")


@hookspec
def mlcweb_models() -> list[ModelSpec]:  # type: ignore[empty-body]
    """Declare the models this plugin provides."""


@hookspec(firstresult=True)
def mlcweb_import_model(spec: ModelSpec, options: ImportOptions) -> ImportedModel | None:
    """Import ``spec`` into Relax (weights as inputs, see :class:`~mlcweb.model.ImportedModel`).

    Only the plugin that declared ``spec`` is asked. Raise :class:`~mlcweb.errors.MlcwebError` for bad
    input (a missing or wrong ``options.model_path``) with a message that says what to fix.
    """


@hookspec
def mlcweb_pipeline_passes(  # type: ignore[empty-body]
    spec: ModelSpec, target: tvm.target.Target, options: BuildOptions
) -> list[tvm.transform.Pass]:
    """Passes to run after fusion and before scheduling when building ``spec`` for ``target``."""


@hookspec
def mlcweb_write_assets(  # type: ignore[empty-body]
    spec: ModelSpec, out_dir: Path, target: tvm.target.Target, options: BuildOptions, imported: ImportedModel
) -> list[str]:
    """Write runtime assets (scheduler constants, tokenizer files, web extras) into ``out_dir``.

    Return the paths written, relative to ``out_dir``; the host lists them in the manifest.
    """

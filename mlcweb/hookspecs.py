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

    from .model import BuildOptions, ImportedModel, ImportOptions, ModelSpec, PhaseContext

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
def mlcweb_phase_passes(  # type: ignore[empty-body]
    spec: ModelSpec, phase: str, context: PhaseContext
) -> list[tvm.transform.Pass]:
    """Passes to add to pipeline ``phase`` (one of ``mlcweb_passes.PHASES``) when building ``spec``.

    Called once per phase; return ``[]`` for phases the plugin leaves alone. In the ``weights`` phase the
    passes run on the imported module after the layout passes and before weight lifting (rewrites that
    change how weights are stored: their cost is paid once, on the weights); in every later phase, at the
    phase's end. ``context`` says the target, dtype and convolution layout the phases are made for.
    """


@hookspec
def mlcweb_write_assets(  # type: ignore[empty-body]
    spec: ModelSpec, out_dir: Path, target: tvm.target.Target, options: BuildOptions, imported: ImportedModel
) -> list[str]:
    """Write runtime assets (scheduler constants, tokenizer files, web extras) into ``out_dir``.

    Return the paths written, relative to ``out_dir``; the host lists them in the manifest.
    """

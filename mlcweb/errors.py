"""Errors the host raises for bad input; the command line prints them without a traceback."""

from __future__ import annotations


class MlcwebError(Exception):
    """Base class: the message names the problem and how to fix it."""


class ModelNotFoundError(MlcwebError):
    """No installed plugin provides the requested model."""


class PluginConflictError(MlcwebError):
    """Two plugins claim the same model name."""


class TargetUnavailableError(MlcwebError):
    """The requested target is unknown or the installed TVM cannot build for it."""


class CorruptArtifactError(MlcwebError):
    """An artifact file is missing, truncated or does not match its recorded hash."""

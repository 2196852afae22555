"""Typing support shared by the pass classes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import tvm


class ModulePassBase:
    """Base of the ``@tvm.transform.module_pass`` classes of this package.

    The decorator turns each class into a ``tvm.transform.ModulePass`` whose instances are called on
    an IRModule; type checkers do not apply class decorators, so this declares the call for them.
    """

    if TYPE_CHECKING:

        def __call__(self, mod: tvm.IRModule) -> tvm.IRModule: ...

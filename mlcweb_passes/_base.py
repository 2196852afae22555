"""Typing support shared by the pass classes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import tvm
from tvm import relax


class ModulePassBase:
    """Base of the ``@tvm.transform.module_pass`` classes of this package.

    The decorator turns each class into a ``tvm.transform.ModulePass`` whose instances are called on
    an IRModule; type checkers do not apply class decorators, so this declares the call for them.
    """

    if TYPE_CHECKING:

        def __call__(self, mod: tvm.IRModule) -> tvm.IRModule: ...


def rewrite_relax_functions(mod: tvm.IRModule, rewriter: Any) -> tvm.IRModule:
    """Run a ``PyExprMutator`` (built on ``mod``) over every Relax function of ``mod``; the new module."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    result: tvm.IRModule = rewriter.builder_.get()
    return result

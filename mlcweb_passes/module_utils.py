"""Module utilities: merge IRModules and drop functions nothing reaches.

A model with several stages is often imported one stage at a time (text encoder, UNet, VAE), each
into its own IRModule. Deploying them as one library needs one module; :func:`merge_modules` joins
them and refuses, with both owners named, to silently let one stage's function replace another's.
:class:`RemoveUnusedFunctions` then keeps only what the entry functions call, so helpers left behind
by earlier passes do not get compiled.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import tvm
import tvm_ffi
from tvm import relax

from ._relax import ModulePassBase

__all__ = ["FunctionNameClashError", "RemoveUnusedFunctions", "merge_modules", "reachable_functions"]


class FunctionNameClashError(ValueError):
    """Two modules define a function under the same name."""


def merge_modules(*modules: tvm.IRModule, names: Sequence[str] | None = None) -> tvm.IRModule:
    """Merge ``modules`` into one IRModule.

    ``names`` optionally labels each module in error messages (default: ``module 0``, ``module 1``...).
    Raises :class:`FunctionNameClashError` when two modules define the same function name, unless both
    definitions are structurally equal (a PrimFunc legalized identically in two stages is shared).
    """
    labels = list(names) if names is not None else [f"module {i}" for i in range(len(modules))]
    if len(labels) != len(modules):
        raise ValueError(f"got {len(modules)} modules but {len(labels)} names")
    owner: dict[str, str] = {}
    funcs: dict[str, tuple[tvm.ir.GlobalVar, tvm.ir.BaseFunc]] = {}
    attrs: dict[str, object] = {}
    for label, mod in zip(labels, modules, strict=True):
        for gv, func in mod.functions_items():
            name = gv.name_hint
            if name in funcs:
                if tvm_ffi.structural_equal(funcs[name][1], func, map_free_vars=True):
                    continue
                raise FunctionNameClashError(
                    f"function {name!r} is defined by both {owner[name]} and {label} with different "
                    "bodies; rename one of them before merging"
                )
            owner[name] = label
            funcs[name] = (gv, func)
        if mod.attrs is not None:
            for key, value in mod.attrs.items():
                attrs.setdefault(str(key), value)
    # Each module's functions refer to that module's GlobalVar objects; point every reference at the
    # one GlobalVar the merged module keeps for that name.
    canonical = {name: gv for name, (gv, _) in funcs.items()}
    rebind = _GlobalVarRebinder(canonical)
    merged = tvm.IRModule(
        {gv: rebind.visit_expr(func) if isinstance(func, relax.Function) else func for gv, func in funcs.values()}
    )
    return merged.with_attrs(attrs) if attrs else merged


@relax.expr_functor.mutator
class _GlobalVarRebinder(relax.PyExprMutator):
    def __init__(self, gvs: dict[str, tvm.ir.GlobalVar]) -> None:
        super().__init__()
        self.gvs = gvs

    def visit_global_var_(self, op: tvm.ir.GlobalVar) -> tvm.ir.GlobalVar:
        return self.gvs.get(op.name_hint, op)


def _callees(func: tvm.ir.BaseFunc) -> list[str]:
    # PrimFuncs produced by Relax lowering do not call other module functions; only Relax
    # functions reference GlobalVars (call_tir targets, subroutines, composite functions).
    if isinstance(func, relax.Function):
        return [gv.name_hint for gv in relax.analysis.all_global_vars(func)]
    return []


def reachable_functions(mod: tvm.IRModule, entries: Iterable[str]) -> set[str]:
    """Names of the functions reachable from ``entries`` through calls and references."""
    present = {gv.name_hint for gv in mod.get_global_vars()}
    todo = list(entries)
    missing = [e for e in todo if e not in present]
    if missing:
        raise KeyError(f"entry functions not in the module: {missing}")
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(c for c in _callees(mod[name]) if c in present)
    return seen


def _public_functions(mod: tvm.IRModule) -> list[str]:
    return [gv.name_hint for gv, f in mod.functions.items() if f.attrs is not None and "global_symbol" in f.attrs]


@tvm.transform.module_pass(opt_level=0, name="mlcweb.RemoveUnusedFunctions")
class RemoveUnusedFunctions(ModulePassBase):
    """Remove every function not reachable from the entry functions.

    ``entry_functions`` defaults to the module's public functions (those with a ``global_symbol``).
    Unlike ``DeadCodeElimination`` it leaves function bodies alone, so it can run at any stage.
    """

    def __init__(self, entry_functions: Sequence[str] | None = None) -> None:
        self.entry_functions = list(entry_functions) if entry_functions is not None else None

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        entries = self.entry_functions if self.entry_functions is not None else _public_functions(mod)
        keep = reachable_functions(mod, entries)
        out = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint in keep})
        return out.with_attrs(dict(mod.attrs.items())) if mod.attrs is not None else out

"""Static memory planning and a report of what it planned.

After ``CallTIRRewrite`` every intermediate tensor is an ``R.builtin.alloc_tensor``: left alone, the VM
allocates each one (through its pool, but with no knowledge of lifetimes). ``StaticPlanBlockMemory``
computes tensor lifetimes and reuses storage between tensors that are never alive together, turning
allocations into a few ``R.memory.alloc_storage`` blocks sized in bytes. :class:`StaticMemoryPlan` runs
the lowering it needs and the planner; :func:`memory_report` reads the result so a build can print and
record how much device memory each function needs before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import relax

from .._relax import ModulePassBase

__all__ = ["FunctionMemory", "StaticMemoryPlan", "memory_report"]


@tvm.transform.module_pass(opt_level=0, name="mlcweb.StaticMemoryPlan")
class StaticMemoryPlan(ModulePassBase):
    """Lower dataflow to explicit allocations and plan them statically.

    Runs ``RewriteDataflowReshape``, ``ToNonDataflow``, ``RemovePurityChecking``, ``CallTIRRewrite`` and
    ``StaticPlanBlockMemory``: the part of TVM's build pipeline that decides memory.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return tvm.transform.Sequential(
            [
                relax.transform.RewriteDataflowReshape(),
                relax.transform.ToNonDataflow(),
                relax.transform.RemovePurityChecking(),
                relax.transform.CallTIRRewrite(),
                relax.transform.StaticPlanBlockMemory(),
            ]
        )(mod)


@dataclass(frozen=True)
class FunctionMemory:
    """Planned device memory of one Relax function.

    ``planned_bytes``: total size of its ``alloc_storage`` blocks (what the function holds at once, at
    most); ``largest_bytes``: the largest single block; ``storages``: how many blocks;
    ``unplanned``: allocations left to run time: the function's outputs (they outlive the call) and
    tensors whose shape is not known at compile time.
    """

    name: str
    planned_bytes: int
    largest_bytes: int
    storages: int
    unplanned: int
    sizes: tuple[int, ...] = field(default=(), repr=False)


_ALLOC_STORAGE = tvm.ir.Op.get("relax.memory.alloc_storage")
_BUILTIN_ALLOC = tvm.ir.Op.get("relax.builtin.alloc_tensor")


def _storage_bytes(call: relax.Call) -> int | None:
    shape = call.args[0]
    if isinstance(shape, relax.ShapeExpr) and all(isinstance(v, tvm.tirx.IntImm) for v in shape.values):
        size = 1
        for v in shape.values:
            size *= int(v)
        return size
    return None


def _function_memory(name: str, func: relax.Function) -> FunctionMemory:
    sizes: list[int] = []
    unplanned = 0

    def visit(expr: relax.Expr) -> None:
        nonlocal unplanned
        if not isinstance(expr, relax.Call):
            return
        if expr.op.same_as(_ALLOC_STORAGE):
            size = _storage_bytes(expr)
            if size is None:
                unplanned += 1
            else:
                sizes.append(size)
        elif expr.op.same_as(_BUILTIN_ALLOC):
            unplanned += 1

    relax.analysis.post_order_visit(func.body, visit)
    return FunctionMemory(
        name=name,
        planned_bytes=sum(sizes),
        largest_bytes=max(sizes, default=0),
        storages=len(sizes),
        unplanned=unplanned,
        sizes=tuple(sorted(sizes, reverse=True)),
    )


def memory_report(mod: tvm.IRModule) -> dict[str, FunctionMemory]:
    """Per Relax function, the storage planned by :class:`StaticMemoryPlan` (run it first)."""
    return {
        gv.name_hint: _function_memory(gv.name_hint, func)
        for gv, func in mod.functions_items()
        if isinstance(func, relax.Function)
    }

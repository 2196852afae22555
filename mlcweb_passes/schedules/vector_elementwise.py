"""A WebGPU schedule rule: elementwise kernels with ``vector`` adjacent elements a thread.

dlight's ``Fallback`` gives each invocation one element of an elementwise kernel (a GEGLU's
``a * gelu(g)``, a residual add, casts, a skip connection's copy). In float16 each of its loads is 2 bytes:
a 32-lane warp asks for 64 bytes at a time, and SD1.5's 64x64 GEGLU (42 MB in, 21 MB out) ran at 1.3
TB/s on an H100 through Dawn (twentieth run's profile), about half of what a memory-bound kernel reaches.

:class:`VectorElementwise` takes a function whose blocks all inline into one spatial block (after
dlight's inlining) that writes its output along the innermost loop with unit stride, where that loop's
extent is a multiple of ``vector``: the loops are fused, each invocation takes ``vector`` adjacent output
elements, and the innermost loop is vectorised. Reads that walk the same axis with unit stride become
vector loads (``array<vec4<T>>`` with :mod:`~mlcweb_passes.webgpu.vector_storage`); broadcast reads (a
bias) stay loads of one element. Everything else falls through to the next rule.
"""

from __future__ import annotations

from functools import reduce
from typing import Any

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from .._tir import dtype_of, inlined_blocks

__all__ = ["VectorElementwise"]

# Intrinsics TVM 0.27 vectorises for WebGPU (a kernel calling any other, e.g. erf, rsqrt or round, is
# left as a loop over the vector's elements: not what this rule is for), checked by
# tests/passes/schedules/test_vector_elementwise.py
VECTOR_CALLS = frozenset(
    f"tirx.{name}" for name in ("exp", "tanh", "sigmoid", "sqrt", "sin", "cos", "log", "floor", "fabs", "pow")
)


class VectorElementwise(dl.ScheduleRule):
    """``vector`` elements a thread for WebGPU elementwise kernels of at least ``min_elements`` outputs,
    ``threads`` a workgroup (see the module docstring)."""

    def __init__(self, vector: int = 4, threads: int = 256, min_elements: int = 65536) -> None:
        self.vector = vector
        self.threads = threads
        self.min_elements = min_elements

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "webgpu":
            return None
        normalised = inlined_blocks(_expand_erf(func))
        if normalised is None:
            return None
        sch, infos = normalised
        if len(infos) != 1 or not infos[0].is_injective() or infos[0].is_reduction():
            return None
        block = infos[0].block_rv
        loops = sch.get_loops(block)
        extents = [sch.get(lp).extent for lp in loops]
        if not loops or not all(isinstance(e, tirx.IntImm) for e in extents):
            return None
        sizes = [int(e) for e in extents]
        threads = min(self.threads, int(target.attrs.get("max_num_threads", 256)))
        total = reduce(lambda a, b: a * b, sizes, 1)
        if sizes[-1] % self.vector or total < self.min_elements or total % (self.vector * threads):
            return None
        if not _writes_along(sch.get(block)) or not _vectorises(sch.get(block)):
            return None
        try:
            outer, vec = sch.split(loops[-1], factors=[None, self.vector])
            bx, tx = sch.split(sch.fuse(*loops[:-1], outer), factors=[None, threads])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
            sch.vectorize(vec)
        except s_tir.ScheduleError:
            return None
        return sch


def _writes_along(block: tirx.SBlock) -> bool:
    """Whether ``block`` stores once, its last index its last iteration variable (the innermost loop's,
    in dlight's normalised form): adjacent invocations' vectors are adjacent in memory."""
    if len(block.writes) != 1 or not isinstance(block.body, tirx.BufferStore):
        return False
    last = block.body.indices[-1]
    return isinstance(last, tirx.Var) and block.iter_vars[-1].var.same_as(last)


def _vectorises(block: tirx.SBlock) -> bool:
    """Whether every intrinsic ``block`` calls is one of :data:`VECTOR_CALLS`."""
    calls: list[str] = []
    tvm_ffi.structural_walk(block.body, ((tvm.ir.Call, lambda call: calls.append(str(call.op.name))),))
    return all(name in VECTOR_CALLS for name in calls)


# erf(x) ~ x * P(x^2) / Q(x^2) on [-4, 4] (clamped outside): the rational form TVM lowers WebGPU's erf
# to (topi's fast_erf, Eigen's coefficients), written out so that it vectorises
_ERF_P = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
_ERF_Q = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)


def _erf(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """float32 ``erf(x)`` as :data:`_ERF_P` / :data:`_ERF_Q` of the clamped ``x``."""
    f32 = "float32"
    v = tirx.max(tirx.min(x, tirx.const(4.0, f32)), tirx.const(-4.0, f32))
    v2 = v * v

    def horner(coefficients: tuple[float, ...]) -> tirx.PrimExpr:
        acc: tirx.PrimExpr = tirx.const(coefficients[0], f32)
        for c in coefficients[1:]:
            acc = acc * v2 + tirx.const(c, f32)
        return acc

    return v * horner(_ERF_P) / horner(_ERF_Q)


def _expand_erf(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with each float32 ``erf`` call written out as :func:`_erf` (the same approximation)."""

    def on_call(node: Any, mutator: Any) -> Any:
        value = mutator.default_mutate(node)
        if str(value.op.name) == "tirx.erf" and dtype_of(value) == "float32":
            return _erf(value.args[0])
        return value

    body = tvm_ffi.structural_mutate(func.body, ((tvm.ir.Call, on_call),))
    return func if body.same_as(func.body) else tirx.PrimFunc(func.params, body, func.ret_type, func.attrs)

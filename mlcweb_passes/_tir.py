"""Helpers the TIR schedule rules and kernel generators share: block normalisation, cross-lane
reductions, variable and load walks."""

from __future__ import annotations

from typing import Any

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import SBlockInfo, normalize_prim_func


def inlined_blocks(func: tirx.PrimFunc) -> tuple[s_tir.Schedule, list[SBlockInfo]] | None:
    """A schedule of ``func`` with its blocks normalised and injective ones inlined (dlight's start), or
    None for a function dlight cannot normalise."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    return sch, try_inline(sch, infos)


def normalise_gemm(sch: s_tir.Schedule, main: s_tir.schedule.SBlockRV) -> None:
    """Rewrite GEMM block ``main`` as ``C[S, I, J] += A[S, I, K] * B[S, J, K]`` (dlight's reindexing:
    the operands and the result copied into that layout, which inlining later folds away)."""
    from tvm.s_tir.dlight.gpu.matmul import get_index_map

    read_a, read_b = sch.reindex(main, ("read", 0)), sch.reindex(main, ("read", 1))
    write_c = sch.reindex(main, ("write", 0))
    maps = get_index_map(sch.get(main))
    assert maps is not None
    matmul_map, a_map, b_map, c_map = maps
    sch.transform_layout(read_a, ("write", 0), a_map)
    sch.transform_layout(read_b, ("write", 0), b_map)
    sch.transform_layout(write_c, ("read", 0), c_map)
    sch.transform_block_layout(main, matmul_map)


def try_inline(sch: s_tir.Schedule, blocks: list[SBlockInfo]) -> list[SBlockInfo]:
    """Inline every block that inlines (into its consumer, else into its producer); the rest. dlight's
    function of the same name catches everything, a KeyboardInterrupt included (a bare ``except``);
    this lets interrupts through."""
    while True:
        for step in (sch.compute_inline, sch.reverse_compute_inline):
            index = _first_that(step, blocks)
            if index is not None:
                blocks.pop(index)
                break
        else:
            return blocks


def _first_that(step: Any, blocks: list[SBlockInfo]) -> int | None:
    for index, block in enumerate(blocks):
        try:
            step(block.block_rv)
        except Exception:  # any failed schedule step, as dlight's; not KeyboardInterrupt
            continue
        return index
    return None


def one_reduction(func: tirx.PrimFunc) -> tuple[s_tir.Schedule, list[SBlockInfo], SBlockInfo] | None:
    """For a function with one reduction and only elementwise blocks besides (a norm and its epilogue):
    :func:`inlined_blocks`' schedule, its blocks and the reduction; None for anything else."""
    normalized = inlined_blocks(func)
    if normalized is None:
        return None
    sch, infos = normalized
    reductions = [info for info in infos if info.is_reduction()]
    if len(reductions) != 1 or any(not (info.is_reduction() or info.is_injective()) for info in infos):
        return None
    return sch, infos, reductions[0]


def reduce_across_lanes(
    sch: s_tir.Schedule,
    block: s_tir.schedule.SBlockRV,
    at: s_tir.schedule.LoopRV,
    row_axes: int,
    lanes: int,
    scope: str,
) -> None:
    """Compute reduction ``block`` under loop ``at`` (its row's loop), its reduction loops strided over
    ``lanes`` threads of ``threadIdx.x`` (a cross-thread reduction), every output kept in ``scope``.
    ``row_axes``: the block's leading spatial axes, unit loops under ``at`` once it is computed there."""
    sch.compute_at(block, at, preserve_unit_loops=True)
    loops = sch.get_loops(block)
    depth = 1 + next(i for i, loop in enumerate(loops) if sch.get_sref(loop).same_as(sch.get_sref(at)))
    own = loops[depth + row_axes :]
    serial, lane = sch.split(sch.fuse(*own), factors=[None, lanes])
    sch.reorder(lane, serial)
    sch.bind(lane, "threadIdx.x")
    for index in range(len(sch.get(block).writes)):
        sch.set_scope(block, index, scope)


def dtype_of(e: Any) -> str:
    """The element type of a TIR expression."""
    return str(e.ty.dtype)


def uses_var(expr: tirx.PrimExpr, var: tirx.Var) -> bool:
    """True when ``var`` occurs in ``expr``."""
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def buffer_loads(e: Any) -> list[Any]:
    """Every buffer load in TIR expression ``e``, those in other loads' indices included."""
    if isinstance(e, tvm.ir.TensorLoad):
        return [e, *(x for i in e.indices for x in buffer_loads(i))]
    children = [getattr(e, f) for f in ("a", "b", "value", "condition", "true_value", "false_value") if hasattr(e, f)]
    children += list(e.args) if isinstance(e, tvm.ir.Call) else []
    return [x for c in children for x in buffer_loads(c)]


# PrimFunc attributes that say a function is scheduled, and where its schedule came from.
SCHEDULED_ATTR = "tirx.is_scheduled"
SOURCE_ATTR = "mlcweb.schedule"  # "tuned", "default", or HAND_WRITTEN
HAND_WRITTEN = "hand-written"  # kernels built already scheduled (flash attention, generated wgmma launchers)

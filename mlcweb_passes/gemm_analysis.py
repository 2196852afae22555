"""What a fused PrimFunc computes when it is one float16 GEMM: its axes, operands and epilogue.

The analysis the tensor-core kernel generators share (:mod:`~mlcweb_passes.cuda.wgmma_plan` writes CUDA
from it, :mod:`~mlcweb_passes.webgpu.matrix_gemm` WGSL). What the PrimFunc may hold (anything else raises
:class:`UnsupportedGemmError`, and the schedule rules keep it):

- producers that inline into the GEMM (a convolution's padding: the im2col window and its zeros come
  straight from the input, a split-K batch index too);
- one reduction block ``C[...] += float32(X) * float32(Y)`` of float16 buffers, both read with one
  reduction axis innermost, unit-stride and a multiple of 8 long (NHWC convolutions after
  :class:`~mlcweb_passes.ConvLayout`, linear layers after :class:`~mlcweb_passes.LinearWeightLayout`);
- an elementwise chain after it (casts, bias, scale, residual additions, a transpose), inlined into one
  expression; or one whose output ``j`` reads the GEMM's columns ``2j`` and ``2j + 1`` (a GEGLU after
  :class:`~mlcweb_passes.GegluPairs`).

Axes that index ``C`` and ``X`` are the GEMM's rows (M), ``C`` and ``Y`` its columns (N), all three its
batch, ``X`` and ``Y`` its reduction (K); each group is flattened in the block's order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import tvm
import tvm_ffi
from tvm import s_tir, sym, tirx
from tvm.s_tir.dlight.gpu.matmul import get_reduction_blocks

from ._tir import buffer_loads, dtype_of, uses_var

__all__ = [
    "Gemm",
    "GemmFunc",
    "Operand",
    "UnsupportedGemmError",
    "analyze_gemm_func",
    "epilogue",
    "find_gemm",
    "flatten_axes",
    "inline_around",
    "output_value",
]

_LOAD = tvm.ir.TensorLoad


class UnsupportedGemmError(Exception):
    """The PrimFunc is not a GEMM this kernel can run."""


def flatten_axes(groups: dict[str, list[tuple[Any, int]]]) -> tuple[Any, dict[Any, str]]:
    """An analyzer in which each GEMM axis variable stands for its part of its group's flat index (the
    group's axes in row-major order), and the flat variables' C++ names ``s``, ``m``, ``n``, ``k``."""
    analyzer = sym.Analyzer()
    names: dict[Any, str] = {}
    for key, group in groups.items():
        dtypes = {dtype_of(var) for var, _ in group} or {"int32"}
        if len(dtypes) != 1:
            raise UnsupportedGemmError(f"the {key} axes mix index types")
        flat = tirx.Var(key, dtypes.pop())
        names[flat] = key
        analyzer.bind(flat, tvm.ir.Range(0, math.prod(extent for _, extent in group)))
        stride = 1
        for var, extent in reversed(group):
            analyzer.bind(var, tirx.floormod(tirx.floordiv(flat, stride), extent))
            stride *= extent
    return analyzer, names


@dataclass(frozen=True)
class Operand:
    buffer: Any
    indices: list[Any]
    condition: Any  # None, or where the element is nonzero


def operand(expr: Any) -> Operand:
    """A GEMM operand read straight from a float16 buffer, perhaps under a zero-padding condition."""
    if isinstance(expr, tirx.Cast) and dtype_of(expr) == "float32":
        expr = expr.value
    if dtype_of(expr) != "float16":
        raise UnsupportedGemmError("operand is not float16")
    if isinstance(expr, _LOAD):
        return Operand(expr.source, list(expr.indices), None)
    if isinstance(expr, tvm.ir.Call) and expr.op.name in ("prim.if_then_else", "tirx.if_then_else"):
        cond, value, zero = expr.args
        if isinstance(value, _LOAD) and isinstance(zero, tirx.FloatImm) and float(zero.value) == 0:
            return Operand(value.source, list(value.indices), cond)
    raise UnsupportedGemmError("operand is not a buffer load")


def inline_around(sch: s_tir.Schedule, gemm: Any) -> Any:
    """Inline every other block: producers into the GEMM, the epilogue chain into its last block. Returns
    the last block (None when the GEMM writes the output itself)."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    index = names.index(sch.get(gemm).name_hint)
    for producer in blocks[:index]:
        sch.compute_inline(producer)
    epilogue = blocks[index + 1 :]
    for block in epilogue[:-1]:
        sch.compute_inline(block)
    return epilogue[-1] if epilogue else None


@dataclass(frozen=True)
class Gemm:
    """The reduction block's store, its two operands, its axes grouped (``s``, ``m``, ``n``, ``k``) and
    each group's flat size."""

    store: Any
    x: Operand
    y: Operand
    groups: dict[str, list[tuple[Any, int]]]
    sizes: dict[str, int]


def find_gemm(block: Any) -> Gemm:
    store = block.body
    if not isinstance(store, tirx.BufferStore):
        raise UnsupportedGemmError("reduction block is not one store")
    value = store.value
    if not (isinstance(value, tirx.Add) and isinstance(value.a, _LOAD) and isinstance(value.b, tirx.Mul)):
        raise UnsupportedGemmError("not an accumulation of products")
    if str(store.buffer.dtype) != "float32" or not value.a.source.same_as(store.buffer):
        raise UnsupportedGemmError("not a float32 accumulation")
    x, y = operand(value.b.a), operand(value.b.b)
    groups = _axis_groups(block, x, y, list(store.indices))
    _check_reduction_innermost(groups["k"][-1], x, y)
    sizes = {key: math.prod(e for _, e in group) for key, group in groups.items()}
    return Gemm(store, x, y, groups, sizes)


def _axis_groups(block: Any, x: Operand, y: Operand, out_indices: list[Any]) -> dict[str, list[tuple[Any, int]]]:
    """Each block axis by the buffers it indexes: batch (all three), M (C and X), N (C and Y), K (X, Y)."""

    def used(var: Any, operand: Operand) -> bool:
        exprs = [*operand.indices, *([operand.condition] if operand.condition is not None else [])]
        return any(uses_var(e, var) for e in exprs)

    kind = {(True, True, True): "s", (True, False, True): "m", (False, True, True): "n", (True, True, False): "k"}
    groups: dict[str, list[tuple[Any, int]]] = {"s": [], "m": [], "n": [], "k": []}
    for iv in block.iter_vars:
        in_c = any(uses_var(e, iv.var) for e in out_indices)
        key = kind.get((used(iv.var, x), used(iv.var, y), in_c))
        if key is None or (key == "k") != (iv.iter_type == tirx.IterVar.CommReduce):
            raise UnsupportedGemmError(f"axis {iv.var} is not a GEMM axis")
        groups[key].append((iv.var, int(iv.dom.extent)))
    if not groups["m"] or not groups["n"] or not groups["k"]:
        raise UnsupportedGemmError("missing GEMM axes")
    return groups


def _check_reduction_innermost(inner: tuple[Any, int], x: Operand, y: Operand) -> None:
    """Both operands read 16-byte vectors along the innermost reduction axis."""
    inner_k, inner_extent = inner
    for operand in (x, y):
        last_index = operand.indices[-1]
        if not (isinstance(last_index, tirx.Var) and last_index.same_as(inner_k)):
            raise UnsupportedGemmError("reduction axis is not innermost")
        if any(uses_var(e, inner_k) for e in operand.indices[:-1]) or (
            operand.condition is not None and uses_var(operand.condition, inner_k)
        ):
            raise UnsupportedGemmError("reduction axis also indexes elsewhere")
        if int(operand.buffer.shape[-1]) % 8 or inner_extent % 8:
            raise UnsupportedGemmError("rows are not 16-byte vectors")


def epilogue(block: Any, store: Any, analyzer: Any, out: Any, inner_n: Any = None) -> tuple:
    """The last epilogue block's value and output indices, the loads of the GEMM result that read column
    ``n + 1`` (a column-pair epilogue's second accumulator), and whether the epilogue is over column pairs
    (then the kernel computes it once per pair, even when it reads only one of the two columns).

    The epilogue's variables are bound in ``analyzer`` to the GEMM output's indices they read. A pair
    epilogue (:class:`~mlcweb_passes.GegluPairs`) reads the result at columns ``2j`` and ``2j + 1`` of
    its variable ``j``: possible where the GEMM's columns are one axis ``inner_n`` of even length, and
    ``j`` is bound to ``inner_n / 2``."""
    final = block.body
    if not isinstance(final, tirx.BufferStore) or not final.buffer.same_as(out):
        raise UnsupportedGemmError("epilogue does not write the output")
    loads = [e for e in buffer_loads(final.value) if e.source.same_as(store.buffer)]
    if not loads or any(len(load.indices) != len(store.indices) for load in loads):
        raise UnsupportedGemmError("epilogue does not read the GEMM result elementwise")
    own = [iv.var for iv in block.iter_vars]
    index_of: dict[Any, Any] = {}
    acc1: list[Any] = []
    paired = False
    for load in loads:
        for position, index in enumerate(load.indices):
            if isinstance(index, tirx.Var) and any(index.same_as(v) for v in own):
                var, gemm_index = index, store.indices[position]
            else:
                column = _pair_column(index, own) if position == len(load.indices) - 1 else None
                if column is None or inner_n is None or not store.indices[position].same_as(inner_n):
                    raise UnsupportedGemmError("epilogue reads the GEMM result at computed indices")
                var, gemm_index, paired = column[0], tirx.floordiv(inner_n, 2), True
                if column[1]:
                    acc1.append(load)
            if var in index_of and not tvm_ffi.structural_equal(index_of[var], gemm_index):
                raise UnsupportedGemmError("epilogue reads the GEMM result both by column and by column pair")
            index_of[var] = gemm_index
    if len(index_of) != len(own):
        raise UnsupportedGemmError("epilogue has axes of its own")
    for var, gemm_index in index_of.items():
        analyzer.bind(var, gemm_index)
    return final.value, [_resolve(i, index_of) for i in final.indices], acc1, paired


def output_value(gemm: Gemm, last: Any, analyzer: Any, out: Any, inner_n: Any = None) -> tuple:
    """What the kernel writes to ``out``: :func:`epilogue`'s ``(value, indices, acc1, paired)`` for the
    last epilogue block ``last``, or, when the GEMM writes ``out`` itself (``last`` is None), the
    accumulator at the GEMM's own indices."""
    store = gemm.store
    if last is None:
        if not store.buffer.same_as(out):
            raise UnsupportedGemmError("GEMM result is not the output")
        indices = list(store.indices)
        return tirx.BufferLoad(store.buffer, indices), indices, [], False
    return epilogue(last, store, analyzer, out, inner_n)


def _pair_column(index: Any, own: list[Any]) -> tuple[Any, int] | None:
    """``(j, 0)`` for an index ``2 * j`` of an epilogue variable ``j``, ``(j, 1)`` for ``2 * j + 1``,
    else None."""
    for var in own:
        if uses_var(index, var):
            offset = sym.Analyzer().simplify(index - var * 2)
            if isinstance(offset, tirx.IntImm) and int(offset) in (0, 1):
                return var, int(offset)
    return None


def _resolve(index: Any, index_of: dict[Any, Any]) -> Any:
    """An output index that is one of the epilogue's variables, as the GEMM index it stands for (so the
    pair-store check can compare it with the GEMM's column axis); other indices as they are."""
    if isinstance(index, tirx.Var):
        for var, gemm_index in index_of.items():
            if var.same_as(index):
                return gemm_index
    return index


@dataclass(frozen=True)
class GemmFunc:
    """A PrimFunc taken apart: its GEMM block and the last epilogue block after inlining (None when the
    GEMM writes the output itself)."""

    gemm: Gemm
    last: Any


def analyze_gemm_func(func: tirx.PrimFunc) -> GemmFunc:
    """``func``'s GEMM and epilogue (producers and the epilogue chain inlined); raises
    :class:`UnsupportedGemmError` for a function that is not one float16 GEMM with elementwise
    producers and epilogue, or whose shapes are symbolic."""
    if any(not all(isinstance(x, tirx.IntImm) for x in p.shape) for p in func.params):
        raise UnsupportedGemmError("symbolic shape")
    if any(math.prod(int(x) for x in p.shape) >= 2**31 for p in func.params):
        raise UnsupportedGemmError("a buffer too large for the kernel's int offsets")
    if not isinstance(func.body, s_tir.SBlockRealize):
        raise UnsupportedGemmError("no root block (already scheduled)")
    sch = s_tir.Schedule(func)
    reductions = get_reduction_blocks(sch, sch.get_child_blocks(sch.get_sblock("root")))
    if not reductions or len(reductions) != 1:
        raise UnsupportedGemmError("not one reduction block")
    try:
        last = inline_around(sch, reductions[0])
    except s_tir.ScheduleError as err:
        raise UnsupportedGemmError("blocks around the GEMM do not inline") from err
    return GemmFunc(find_gemm(sch.get(reductions[0])), None if last is None else sch.get(last))

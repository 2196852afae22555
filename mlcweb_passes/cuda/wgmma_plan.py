"""Plan a Hopper ``wgmma`` kernel for a fused PrimFunc: the GEMM's axes, operands and epilogue as C++.

What the PrimFunc may hold (anything else raises :class:`UnsupportedGemmError`, and the schedule rules
keep it):

- producers that inline into the GEMM (a convolution's padding: the im2col window and its zeros come
  straight from the input, a split-K batch index too);
- one reduction block ``C[...] += float32(X) * float32(Y)`` of float16 buffers, both read with one
  reduction axis innermost, unit-stride and a multiple of 8 long (NHWC convolutions after
  :class:`~mlcweb_passes.ConvLayout`, linear layers after :class:`~mlcweb_passes.LinearWeightLayout`);
- an elementwise chain after it (casts, bias, scale, residual additions, a transpose), inlined into one
  expression; or one whose output ``j`` reads the GEMM's columns ``2j`` and ``2j + 1`` (a GEGLU after
  :class:`~mlcweb_passes.GegluPairs`), computed from the two neighbouring accumulators a thread holds.

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

from .._tir import buffer_loads, uses_var
from .c_expr import C_TYPES, CExprPrinter, UnsupportedExprError, dtype_of
from .wgmma_source import BLOCK_K, BLOCK_M, WgmmaKernel, WgmmaTile

__all__ = ["UnsupportedGemmError", "choose_wgmma_tile", "plan_kernel"]

_LOAD = tvm.ir.TensorLoad


class UnsupportedGemmError(Exception):
    """The PrimFunc is not a GEMM this kernel can run."""


def choose_wgmma_tile(batch: int, m: int, n: int, k: int, sms: int) -> WgmmaTile:
    """The tile for a ``batch x m x n`` GEMM over ``k`` on ``sms`` multiprocessors, a rule fitted to
    ``benchmarks/gemm_tiles.py --wgmma-only`` over SD1.5's 32 heaviest GEMMs (benchmarks/README.md).
    Wide tiles read less from L2 per multiply-add, so the widest that divides N is taken where the
    reduction is long enough to amortise a block's start and its blocks fill their waves:

    - 256 columns, 4 stages (one block per SM) where 256 divides N, K >= 1280, and the blocks fill 85% of
      their waves (the VAE's 256- and 512-channel convolutions, 4-5% faster than 128 columns);
    - 160 columns, 4 stages where 160 divides N, the reduction is long (K >= 1280) or N is at most 320
      (128-wide tiles would pad 320 to 384), and the blocks fill at least 3/4 of their waves;
    - else 128 columns, 3 stages (two blocks per SM) when that makes half a wave;
    - else 64 columns, for more blocks;
    - N under 64 (a convolution to 3 or 4 output channels): N rounded up to 8, the narrowest wgmma.
    """
    if n < 64:
        return WgmmaTile(-(-n // 8) * 8, 4)
    rows = batch * -(-m // BLOCK_M)

    def fill(blocks: int) -> float:
        return blocks / (-(-blocks // sms) * sms)

    if n % 256 == 0 and k >= 1280 and fill(rows * (n // 256)) >= 0.85:
        return WgmmaTile(256, 4)
    if n % 160 == 0 and (k >= 1280 or n <= 320) and fill(rows * (n // 160)) >= 0.75:
        return WgmmaTile(160, 4)
    if rows * -(-n // 128) >= sms // 2:
        return WgmmaTile(128, 3)
    return WgmmaTile(64, 4)


def _flatten_axes(groups: dict[str, list[tuple[Any, int]]]) -> tuple[Any, dict[Any, str]]:
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
class _Operand:
    buffer: Any
    indices: list[Any]
    condition: Any  # None, or where the element is nonzero


def _operand(expr: Any) -> _Operand:
    """A GEMM operand read straight from a float16 buffer, perhaps under a zero-padding condition."""
    if isinstance(expr, tirx.Cast) and dtype_of(expr) == "float32":
        expr = expr.value
    if dtype_of(expr) != "float16":
        raise UnsupportedGemmError("operand is not float16")
    if isinstance(expr, _LOAD):
        return _Operand(expr.source, list(expr.indices), None)
    if isinstance(expr, tvm.ir.Call) and expr.op.name in ("prim.if_then_else", "tirx.if_then_else"):
        cond, value, zero = expr.args
        if isinstance(value, _LOAD) and isinstance(zero, tirx.FloatImm) and float(zero.value) == 0:
            return _Operand(value.source, list(value.indices), cond)
    raise UnsupportedGemmError("operand is not a buffer load")


def _inline_around(sch: s_tir.Schedule, gemm: Any) -> Any:
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


def plan_kernel(func: tirx.PrimFunc, name: str, sms: int, tile: WgmmaTile | None = None) -> WgmmaKernel:
    """The wgmma kernel computing ``func`` (with ``tile``, or :func:`choose_wgmma_tile`'s for ``sms``
    multiprocessors); raises :class:`UnsupportedGemmError` when it cannot."""
    _check_params(func)
    sch = s_tir.Schedule(func)
    reductions = get_reduction_blocks(sch, sch.get_child_blocks(sch.get_sblock("root")))
    if not reductions or len(reductions) != 1:
        raise UnsupportedGemmError("not one reduction block")
    try:
        last = _inline_around(sch, reductions[0])
    except s_tir.ScheduleError as err:
        raise UnsupportedGemmError("blocks around the GEMM do not inline") from err
    gemm = _gemm(sch.get(reductions[0]))
    try:
        return _kernel(func, name, gemm, None if last is None else sch.get(last), sms, tile)
    except UnsupportedExprError as err:
        raise UnsupportedGemmError(str(err)) from err


def _check_params(func: tirx.PrimFunc) -> None:
    if any(not all(isinstance(x, tirx.IntImm) for x in p.shape) for p in func.params):
        raise UnsupportedGemmError("symbolic shape")
    if any(math.prod(int(x) for x in p.shape) >= 2**31 for p in func.params):
        raise UnsupportedGemmError("a buffer too large for the kernel's int offsets")
    if not isinstance(func.body, s_tir.SBlockRealize):
        raise UnsupportedGemmError("no root block (already scheduled)")
    if any(str(p.dtype) not in C_TYPES for p in func.params):
        raise UnsupportedGemmError("a parameter of a type the kernel does not take")


@dataclass(frozen=True)
class _Gemm:
    """The reduction block's store, its two operands, its axes grouped (``s``, ``m``, ``n``, ``k``) and
    each group's flat size."""

    store: Any
    x: _Operand
    y: _Operand
    groups: dict[str, list[tuple[Any, int]]]
    sizes: dict[str, int]


def _gemm(block: Any) -> _Gemm:
    store = block.body
    if not isinstance(store, tirx.BufferStore):
        raise UnsupportedGemmError("reduction block is not one store")
    value = store.value
    if not (isinstance(value, tirx.Add) and isinstance(value.a, _LOAD) and isinstance(value.b, tirx.Mul)):
        raise UnsupportedGemmError("not an accumulation of products")
    if str(store.buffer.dtype) != "float32" or not value.a.source.same_as(store.buffer):
        raise UnsupportedGemmError("not a float32 accumulation")
    x, y = _operand(value.b.a), _operand(value.b.b)
    groups = _axis_groups(block, x, y, list(store.indices))
    _check_reduction_innermost(groups["k"][-1], x, y)
    sizes = {key: math.prod(e for _, e in group) for key, group in groups.items()}
    if sizes["m"] < 64 or sizes["k"] < BLOCK_K:
        raise UnsupportedGemmError("too small for a 128-row tile")
    return _Gemm(store, x, y, groups, sizes)


def _axis_groups(block: Any, x: _Operand, y: _Operand, out_indices: list[Any]) -> dict[str, list[tuple[Any, int]]]:
    """Each block axis by the buffers it indexes: batch (all three), M (C and X), N (C and Y), K (X, Y)."""

    def used(var: Any, operand: _Operand) -> bool:
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


def _check_reduction_innermost(inner: tuple[Any, int], x: _Operand, y: _Operand) -> None:
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


def _operand_source(printer: CExprPrinter, buffers: dict[Any, str], operand: _Operand) -> str:
    """The C++ returning the address of an operand's 8 K elements (``ok`` cleared where they are zeros)."""
    cond = f"ok = ok & {printer(operand.condition)}; " if operand.condition is not None else ""
    base = next((name for p, name in buffers.items() if p.same_as(operand.buffer)), None)
    if base is None:
        raise UnsupportedGemmError("operand is computed in the kernel")
    return f"{cond}return ok ? {base} + ({printer.offset(operand.buffer, operand.indices)}) : {base};"


def _kernel(func: tirx.PrimFunc, name: str, gemm: _Gemm, last: Any, sms: int, tile: WgmmaTile | None) -> WgmmaKernel:
    """The kernel's C++ parts for ``gemm`` and its epilogue block ``last`` (None: the GEMM writes the output)."""
    groups, sizes, store = gemm.groups, gemm.sizes, gemm.store
    out_indices = list(store.indices)
    analyzer, names = _flatten_axes(groups)
    buffers = {p: f"p{i}" for i, p in enumerate(func.params)}
    params = tuple(
        f"{'' if i == len(func.params) - 1 else 'const '}{C_TYPES[str(p.dtype)]}* __restrict__ p{i}"
        for i, p in enumerate(func.params)
    )
    printer = CExprPrinter(names, buffers, analyzer)
    a_src, b_src = _operand_source(printer, buffers, gemm.x), _operand_source(printer, buffers, gemm.y)
    out_buffer = func.params[-1]
    acc1: list[Any] = []
    paired = False
    if last is None:  # the GEMM writes the output
        if not store.buffer.same_as(out_buffer):
            raise UnsupportedGemmError("GEMM result is not the output")
        epilogue_value, write_indices = tirx.BufferLoad(store.buffer, out_indices), out_indices
    else:
        inner_n_var = groups["n"][-1][0] if len(groups["n"]) == 1 and sizes["n"] % 2 == 0 else None
        epilogue_value, write_indices, acc1, paired = _epilogue(last, store, analyzer, out_buffer, inner_n_var)
    epi_printer = CExprPrinter(names, buffers, analyzer, acc=store.buffer, acc1=acc1)
    out_type = C_TYPES.get(str(out_buffer.dtype))
    if out_type not in ("half", "float"):
        raise UnsupportedGemmError(f"output dtype {out_buffer.dtype}")
    inner_n = groups["n"][-1]
    pairs = (
        not paired
        and isinstance(write_indices[-1], tirx.Var)
        and write_indices[-1].same_as(inner_n[0])
        and inner_n[1] % 2 == 0
        and int(out_buffer.shape[-1]) % 2 == 0
    )
    return WgmmaKernel(
        name=name,
        tile=tile or choose_wgmma_tile(sizes["s"], sizes["m"], sizes["n"], sizes["k"], sms),
        batch=sizes["s"],
        m=sizes["m"],
        n=sizes["n"],
        k=sizes["k"],
        params=params,
        a_src=a_src,
        b_src=b_src,
        value=f"return {epi_printer(epilogue_value)};",
        offset=f"return {epi_printer.offset(out_buffer, write_indices)};",
        out=f"p{len(func.params) - 1}",
        out_type=out_type,
        pairs=pairs,
        column_pairs=paired,
    )


def _epilogue(block: Any, store: Any, analyzer: Any, out: Any, inner_n: Any = None) -> tuple:
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

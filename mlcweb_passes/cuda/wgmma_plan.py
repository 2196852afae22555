"""Plan a Hopper ``wgmma`` kernel for a fused PrimFunc: the GEMM's axes, operands and epilogue as C++.

What the PrimFunc may hold is :mod:`~mlcweb_passes.gemm_analysis`'s (anything else raises
:class:`UnsupportedGemmError`, and the schedule rules keep it), with at least 64 rows and a 64-deep
reduction; a column-pair epilogue (a GEGLU) is computed from the two neighbouring accumulators a thread
holds.
"""

from __future__ import annotations

from typing import Any

from tvm import tirx

from ..gemm_analysis import Gemm, Operand, UnsupportedGemmError, analyze_gemm_func, flatten_axes, output_value
from .c_expr import C_TYPES, CExprPrinter, UnsupportedExprError
from .wgmma_source import BLOCK_K, BLOCK_M, WgmmaKernel, WgmmaTile

__all__ = ["UnsupportedGemmError", "choose_wgmma_tile", "plan_kernel"]


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


def plan_kernel(func: tirx.PrimFunc, name: str, sms: int, tile: WgmmaTile | None = None) -> WgmmaKernel:
    """The wgmma kernel computing ``func`` (with ``tile``, or :func:`choose_wgmma_tile`'s for ``sms``
    multiprocessors); raises :class:`UnsupportedGemmError` when it cannot."""
    if any(str(p.dtype) not in C_TYPES for p in func.params):
        raise UnsupportedGemmError("a parameter of a type the kernel does not take")
    found = analyze_gemm_func(func)
    if found.gemm.sizes["m"] < 64 or found.gemm.sizes["k"] < BLOCK_K:
        raise UnsupportedGemmError("too small for a 128-row tile")
    try:
        return _kernel(func, name, found.gemm, found.last, sms, tile)
    except UnsupportedExprError as err:
        raise UnsupportedGemmError(str(err)) from err


def _operand_source(printer: CExprPrinter, buffers: dict[Any, str], operand: Operand) -> str:
    """The C++ returning the address of an operand's 8 K elements (``ok`` cleared where they are zeros)."""
    cond = f"ok = ok & {printer(operand.condition)}; " if operand.condition is not None else ""
    base = next((name for p, name in buffers.items() if p.same_as(operand.buffer)), None)
    if base is None:
        raise UnsupportedGemmError("operand is computed in the kernel")
    return f"{cond}return ok ? {base} + ({printer.offset(operand.buffer, operand.indices)}) : {base};"


def _kernel(func: tirx.PrimFunc, name: str, gemm: Gemm, last: Any, sms: int, tile: WgmmaTile | None) -> WgmmaKernel:
    """The kernel's C++ parts for ``gemm`` and its epilogue block ``last`` (None: the GEMM writes the output)."""
    groups, sizes, store = gemm.groups, gemm.sizes, gemm.store
    analyzer, names = flatten_axes(groups)
    buffers = {p: f"p{i}" for i, p in enumerate(func.params)}
    params = tuple(
        f"{'' if i == len(func.params) - 1 else 'const '}{C_TYPES[str(p.dtype)]}* __restrict__ p{i}"
        for i, p in enumerate(func.params)
    )
    printer = CExprPrinter(names, buffers, analyzer)
    a_src, b_src = _operand_source(printer, buffers, gemm.x), _operand_source(printer, buffers, gemm.y)
    out_buffer = func.params[-1]
    inner_n_var = groups["n"][-1][0] if len(groups["n"]) == 1 and sizes["n"] % 2 == 0 else None
    epilogue_value, write_indices, acc1, paired = output_value(gemm, last, analyzer, out_buffer, inner_n_var)
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

"""Replace float16 GEMM kernels with Hopper ``wgmma`` kernels, generated from each fused PrimFunc.

On an H100 the tensor-core schedules TVM 0.27 can express (WMMA, ``mma.sync``) left Stable Diffusion's
linear layers and convolutions at 130-230 TFLOPS, 69% of a UNet step. :class:`WgmmaGemm` rewrites every
fused PrimFunc that is one float16 GEMM plus an elementwise epilogue into a host function launching a
kernel of :mod:`~mlcweb_passes.wgmma_source`, compiled for ``sm_90a`` and attached to the module as an
external CUDA module (``external_mods``, linked by ``tvm.compile``). The PrimFunc keeps its signature, so
its ``call_tir`` callers, memory planning and CUDA graphs are unchanged.

What the PrimFunc may hold (anything else is left to the schedule rules):

- producers that inline into the GEMM (a convolution's padding: the im2col window and its zeros come
  straight from the input, a split-K batch index too);
- one reduction block ``C[...] += float32(X) * float32(Y)`` of float16 buffers, both read with one
  reduction axis innermost, unit-stride and a multiple of 8 long (NHWC convolutions after
  :class:`ConvLayout`, linear layers after :class:`LinearWeightLayout`);
- an elementwise chain after it (casts, bias, scale, residual additions, a transpose), inlined into one
  expression; or one whose output ``j`` reads the GEMM's columns ``2j`` and ``2j + 1`` (a GEGLU after
  :class:`GegluPairs`), computed from the two neighbouring accumulators a thread holds.

Axes that index ``C`` and ``X`` are the GEMM's rows (M), ``C`` and ``Y`` its columns (N), all three its
batch, ``X`` and ``Y`` its reduction (K); each group is flattened in the block's order.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm import s_tir, sym, tirx
from tvm.s_tir.dlight.gpu.matmul import get_reduction_blocks

from ._base import ModulePassBase, buffer_loads, uses_var
from .default_schedule import HAND_WRITTEN, SCHEDULED_ATTR, SOURCE_ATTR
from .tensor_core_matmul import sm_version
from .wgmma_source import BLOCK_K, BLOCK_M, THREADS, WgmmaKernel, WgmmaTile, module_source

__all__ = [
    "UnsupportedGemmError",
    "WgmmaGemm",
    "choose_wgmma_tile",
    "compile_kernels",
    "external_modules",
    "launcher",
    "plan_kernel",
    "supports_wgmma",
]

log = logging.getLogger(__name__)

_LOAD = tvm.ir.TensorLoad
_C_TYPES = {"float16": "half", "float32": "float", "int32": "int", "int64": "long long"}
_BINARY = {
    tirx.Add: "+",
    tirx.Sub: "-",
    tirx.Mul: "*",
    tirx.Div: "/",
    tirx.FloorDiv: "/",  # indices are non-negative wherever their value is used
    tirx.FloorMod: "%",
    tirx.Mod: "%",
    tirx.LT: "<",
    tirx.LE: "<=",
    tirx.GT: ">",
    tirx.GE: ">=",
    tirx.EQ: "==",
    tirx.NE: "!=",
    tirx.And: "&&",
    tirx.Or: "||",
}
_INDEX_TYPES = ("int32", "int64", "bool")
_MIN_MAX = {"float32": ("fminf", "fmaxf"), "float16": ("__hmin", "__hmax")}  # (min, max); else std
_FLOAT_CALLS = {
    "tirx.exp": "expf",
    "tirx.sigmoid": None,
    "tirx.tanh": "tanhf",
    "tirx.erf": "erff",
    "tirx.sqrt": "sqrtf",
}


def _dtype(e: Any) -> str:
    """The element type of a TIR expression."""
    return str(e.ty.dtype)


class UnsupportedGemmError(Exception):
    """The PrimFunc is not a GEMM this kernel can run."""


def choose_wgmma_tile(batch: int, m: int, n: int, k: int, sms: int = 132) -> WgmmaTile:
    """The tile for a ``batch x m x n`` GEMM over ``k``, a rule fitted to ``benchmarks/gemm_tiles.py
    --wgmma-only`` on an H100 (``results/2026-11-24-h100-gemm_tiles-wgmma-2.md``, SD1.5's 32 heaviest
    GEMMs). Wide tiles read less from L2 per multiply-add, so the widest that divides N is taken where
    the reduction is long enough to amortise a block's start and its blocks fill their waves:

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


# --------------------------------------------------------------------------------------------- C++ text
class _Printer:
    """TIR expressions as C++, with variables named by ``names`` and buffers by ``buffers``.

    Integer and boolean expressions (indices, offsets, conditions) are first simplified by ``analyzer``,
    which knows each GEMM axis as a function of the flat ``s``, ``m``, ``n``, ``k`` and their ranges: a
    weight read ``w[f, ry, rx, c]`` with ``ry, rx, c`` taken apart from ``k`` prints as ``n * 2880 + k``,
    not as the divisions and remainders of each axis, which the kernel's loads would otherwise recompute
    for every 16-byte copy."""

    def __init__(
        self, names: dict[Any, str], buffers: dict[Any, str], analyzer: Any, acc: Any = None, acc1: Any = ()
    ) -> None:
        self.names = names
        self.buffers = buffers
        self.analyzer = analyzer
        self.acc = acc  # the GEMM's accumulator buffer: loads of it are the ``acc`` value ...
        self.acc1 = list(acc1)  # ... except these, of the next column (a pair epilogue's ``acc1``)

    def __call__(self, e: Any) -> str:
        index = _dtype(e) in _INDEX_TYPES
        return self._emit(self.analyzer.simplify(e) if index else e, index)

    def _emit(self, e: Any, simplified: bool) -> str:
        def child(x: Any) -> str:
            return self._emit(x, True) if simplified else self(x)

        if isinstance(e, tirx.Var):
            for var, name in self.names.items():
                if var.same_as(e):
                    return name
            raise UnsupportedGemmError(f"free variable {e}")
        if isinstance(e, tirx.IntImm):
            return str(int(e.value)) if _dtype(e) != "bool" else ("true" if e.value else "false")
        if isinstance(e, tirx.FloatImm):
            text = f"{float(e.value)!r}f"
            return f"__float2half({text})" if _dtype(e) == "float16" else text
        if isinstance(e, tirx.Cast):
            return self._cast(_dtype(e), _dtype(e.value), child(e.value))
        if isinstance(e, tirx.FloorDiv | tirx.FloorMod) and not self._truncates_as_floor(e):
            a, b = child(e.a), child(e.b)
            quotient = f"(({a}) / ({b}) - ((({a}) % ({b}) != 0) && ((({a}) < 0) != (({b}) < 0))))"
            return quotient if isinstance(e, tirx.FloorDiv) else f"(({a}) - {quotient} * ({b}))"
        if isinstance(e, tirx.And | tirx.Or) and not buffer_loads(e):
            # Both sides, without C++'s short circuit: a branch per clause cost more than the clause.
            return f"({child(e.a)} {'&' if isinstance(e, tirx.And) else '|'} {child(e.b)})"
        if type(e) in _BINARY:
            return f"({child(e.a)} {_BINARY[type(e)]} {child(e.b)})"
        if isinstance(e, tirx.Not):
            return f"(!{child(e.a)})"
        if isinstance(e, tirx.Min | tirx.Max):
            fn = _MIN_MAX.get(_dtype(e), ("min", "max"))[isinstance(e, tirx.Max)]
            return f"{fn}({child(e.a)}, {child(e.b)})"
        if isinstance(e, tirx.Select):
            return f"({child(e.condition)} ? {child(e.true_value)} : {child(e.false_value)})"
        if isinstance(e, _LOAD):
            return self._load(e)
        if isinstance(e, tvm.ir.Call):
            return self._call(e, child)
        raise UnsupportedGemmError(f"expression {type(e).__name__}")

    def _truncates_as_floor(self, e: Any) -> bool:
        """Whether C's truncating ``/`` and ``%`` give ``e``'s floor division: both operands non-negative."""
        return bool(self.analyzer.can_prove(e.a >= 0) and self.analyzer.can_prove(e.b > 0))

    def _cast(self, to: str, frm: str, text: str) -> str:
        if to == frm:
            return text
        if to not in _C_TYPES:
            raise UnsupportedGemmError(f"cast to {to}")
        if to == "float16":
            return f"__float2half((float)({text}))" if frm != "float32" else f"__float2half({text})"
        if frm == "float16":
            return f"(({_C_TYPES[to]})__half2float({text}))"
        return f"(({_C_TYPES[to]})({text}))"

    def _load(self, e: Any) -> str:
        if self.acc is not None and e.source.same_as(self.acc):
            return "acc1" if any(e.same_as(load) for load in self.acc1) else "acc"
        for buf, name in self.buffers.items():
            if buf.same_as(e.source):
                return f"{name}[{self.offset(buf, list(e.indices))}]"
        raise UnsupportedGemmError(f"load of {e.source}, not a parameter")

    def offset(self, buf: Any, indices: list[Any]) -> str:
        """The row-major element offset of ``indices`` in ``buf``, simplified."""
        flat = indices[0]
        for index, extent in zip(indices[1:], buf.shape[1:], strict=True):
            flat = flat * int(extent) + index
        return self(flat)

    def _call(self, e: Any, child: Any) -> str:
        name = e.op.name
        if name in ("prim.if_then_else", "tirx.if_then_else"):
            cond, a, b = e.args
            return f"({child(cond)} ? {child(a)} : {child(b)})"
        if name in _FLOAT_CALLS and _dtype(e) == "float32":
            arg = child(e.args[0])
            return f"(1.f / (1.f + expf(-({arg}))))" if name == "tirx.sigmoid" else f"{_FLOAT_CALLS[name]}({arg})"
        raise UnsupportedGemmError(f"call {name}")


def _flatten_axes(groups: dict[str, list[tuple[Any, int]]]) -> tuple[Any, dict[Any, str]]:
    """An analyzer in which each GEMM axis variable stands for its part of its group's flat index (the
    group's axes in row-major order), and the flat variables' C++ names ``s``, ``m``, ``n``, ``k``."""
    analyzer = sym.Analyzer()
    names: dict[Any, str] = {}
    for key, group in groups.items():
        dtypes = {_dtype(var) for var, _ in group} or {"int32"}
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


# ------------------------------------------------------------------------------------------- analysis
@dataclass(frozen=True)
class _Operand:
    buffer: Any
    indices: list[Any]
    condition: Any  # None, or where the element is nonzero


def _operand(expr: Any) -> _Operand:
    """A GEMM operand read straight from a float16 buffer, perhaps under a zero-padding condition."""
    if isinstance(expr, tirx.Cast) and _dtype(expr) == "float32":
        expr = expr.value
    if _dtype(expr) != "float16":
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


def plan_kernel(func: tirx.PrimFunc, name: str, sms: int = 132, tile: WgmmaTile | None = None) -> WgmmaKernel:
    """The wgmma kernel computing ``func`` (with ``tile``, or :func:`choose_wgmma_tile`'s); raises
    :class:`UnsupportedGemmError` when it cannot."""
    if any(not all(isinstance(x, tirx.IntImm) for x in p.shape) for p in func.params):
        raise UnsupportedGemmError("symbolic shape")
    if any(math.prod(int(x) for x in p.shape) >= 2**31 for p in func.params):
        raise UnsupportedGemmError("a buffer too large for the kernel's int offsets")
    if not isinstance(func.body, s_tir.SBlockRealize):
        raise UnsupportedGemmError("no root block (already scheduled)")
    if any(str(p.dtype) not in _C_TYPES for p in func.params):
        raise UnsupportedGemmError("a parameter of a type the kernel does not take")
    sch = s_tir.Schedule(func)
    reductions = get_reduction_blocks(sch, sch.get_child_blocks(sch.get_sblock("root")))
    if not reductions or len(reductions) != 1:
        raise UnsupportedGemmError("not one reduction block")
    try:
        last = _inline_around(sch, reductions[0])
    except s_tir.ScheduleError as err:
        raise UnsupportedGemmError("blocks around the GEMM do not inline") from err
    block = sch.get(reductions[0])
    store = block.body
    if not isinstance(store, tirx.BufferStore):
        raise UnsupportedGemmError("reduction block is not one store")
    value = store.value
    if not (isinstance(value, tirx.Add) and isinstance(value.a, _LOAD) and isinstance(value.b, tirx.Mul)):
        raise UnsupportedGemmError("not an accumulation of products")
    if str(store.buffer.dtype) != "float32" or not value.a.source.same_as(store.buffer):
        raise UnsupportedGemmError("not a float32 accumulation")
    x, y = _operand(value.b.a), _operand(value.b.b)
    out_indices = list(store.indices)

    def used(var: Any, operand: _Operand) -> bool:
        exprs = [*operand.indices, *([operand.condition] if operand.condition is not None else [])]
        return any(uses_var(e, var) for e in exprs)

    groups: dict[str, list[tuple[Any, int]]] = {"s": [], "m": [], "n": [], "k": []}
    for iv in block.iter_vars:
        in_x, in_y, in_c = used(iv.var, x), used(iv.var, y), any(uses_var(e, iv.var) for e in out_indices)
        kind = {(True, True, True): "s", (True, False, True): "m", (False, True, True): "n", (True, True, False): "k"}
        key = kind.get((in_x, in_y, in_c))
        if key is None or (key == "k") != (iv.iter_type == tirx.IterVar.CommReduce):
            raise UnsupportedGemmError(f"axis {iv.var} is not a GEMM axis")
        groups[key].append((iv.var, int(iv.dom.extent)))
    if not groups["m"] or not groups["n"] or not groups["k"]:
        raise UnsupportedGemmError("missing GEMM axes")
    inner_k, inner_extent = groups["k"][-1]
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
    sizes = {key: math.prod(e for _, e in group) for key, group in groups.items()}
    if sizes["m"] < 64 or sizes["k"] < BLOCK_K:
        raise UnsupportedGemmError("too small for a 128-row tile")

    analyzer, names = _flatten_axes(groups)
    buffers = {p: f"p{i}" for i, p in enumerate(func.params)}
    params = tuple(
        f"{'' if i == len(func.params) - 1 else 'const '}{_C_TYPES[str(p.dtype)]}* __restrict__ p{i}"
        for i, p in enumerate(func.params)
    )
    printer = _Printer(names, buffers, analyzer)

    def source(operand: _Operand) -> str:
        cond = f"ok = ok & {printer(operand.condition)}; " if operand.condition is not None else ""
        base = next((name for p, name in buffers.items() if p.same_as(operand.buffer)), None)
        if base is None:
            raise UnsupportedGemmError("operand is computed in the kernel")
        return f"{cond}return ok ? {base} + ({printer.offset(operand.buffer, operand.indices)}) : {base};"

    a_src, b_src = source(x), source(y)
    out_buffer = func.params[-1]
    acc1: list[Any] = []
    paired = False
    if last is None:  # the GEMM writes the output
        if not store.buffer.same_as(out_buffer):
            raise UnsupportedGemmError("GEMM result is not the output")
        epilogue_value, write_indices = tirx.BufferLoad(store.buffer, out_indices), out_indices
    else:
        inner_n_var = groups["n"][-1][0] if len(groups["n"]) == 1 and sizes["n"] % 2 == 0 else None
        epilogue_value, write_indices, acc1, paired = _epilogue(sch.get(last), store, analyzer, out_buffer, inner_n_var)
    epi_printer = _Printer(names, buffers, analyzer, acc=store.buffer, acc1=acc1)
    out_type = _C_TYPES.get(str(out_buffer.dtype))
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


# ----------------------------------------------------------------------------------------------- pass
def cuda_runtime() -> bool:
    """Whether this TVM can create CUDA modules (its CUDA runtime is built in)."""
    return tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None


def supports_wgmma(target: tvm.target.Target) -> bool:
    """Whether ``target`` runs the kernels: CUDA sm_90 (Hopper; wgmma is sm_90a only)."""
    return sm_version(target) == 90


def launcher(func: tirx.PrimFunc, kernel: WgmmaKernel) -> tirx.PrimFunc:
    """A host function with ``func``'s signature launching ``kernel``."""
    gx, gy, gz = kernel.grid()
    call = tirx.call_packed(
        kernel.name, *[p.data for p in func.params], gx, gy, gz, THREADS, kernel.tile.shared_bytes()
    )
    host = tirx.PrimFunc(list(func.params), tirx.Evaluate(call), func.ret_type, func.attrs)
    return host.with_attr(SCHEDULED_ATTR, True).with_attr(SOURCE_ATTR, HAND_WRITTEN)


def compile_kernels(kernels: list[WgmmaKernel], arch: str = "sm_90a") -> Any:
    """Compile ``kernels`` into one CUDA runtime module (a cubin, by nvcc when it is on PATH, else by TVM's
    NVRTC route), each kernel launched as TVM launches its own (grid, block, dynamic shared memory)."""
    binary = _cubin(module_source(kernels), arch)
    tags = ["blockIdx.x", "blockIdx.y", "blockIdx.z", "threadIdx.x", "tirx.use_dyn_shared_memory"]
    info = {k.name: {"name": "", "arg_types": ["handle"] * len(k.params), "launch_param_tags": tags} for k in kernels}
    metadata = json.dumps({"tvm_version": tvm.__version__, "func_info": info})
    fmap = tvm_ffi.get_global_func("runtime.LoadMetaDataFromJSON")(metadata)
    return tvm_ffi.get_global_func("ffi.Module.create.cuda")(binary, "cubin", fmap, {})


def _cubin(code: str, arch: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        source, cubin = Path(tmp) / "wgmma.cu", Path(tmp) / "wgmma.cubin"
        if shutil.which("nvcc"):
            source.write_text(code)
            number = arch.removeprefix("sm_")
            cmd = ["nvcc", "--cubin", "-O3", "-std=c++17", f"-gencode=arch=compute_{number},code={arch}"]
            cmd += ["-diag-suppress=177", "-o", str(cubin), str(source)]  # 177: unused index variables
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(f"nvcc failed on the wgmma kernels:\n{done.stderr[-4000:]}")
        else:
            from tvm.support import nvcc

            nvcc.compile_cuda(code, "cubin", arch, ["-std=c++17"], str(cubin), compiler="nvrtc")
        return cubin.read_bytes()


@tvm.transform.module_pass(opt_level=0, name="mlcweb.WgmmaGemm")
class WgmmaGemm(ModulePassBase):
    """Every float16 GEMM PrimFunc the wgmma kernel can run becomes a launch of it (CUDA sm_90 only;
    other targets pass through). See the module docstring."""

    def __init__(self, sms: int = 132) -> None:
        self.sms = sms

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        target = tvm.target.Target.current(allow_none=True)
        if target is None or not supports_wgmma(target):
            return mod
        if not cuda_runtime():
            log.warning("this TVM has no CUDA runtime: the GEMMs keep their schedule rules, not wgmma kernels")
            return mod
        kernels, launchers = [], {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or SCHEDULED_ATTR in func.attrs:
                continue
            try:
                kernel = plan_kernel(func, f"mlcweb_wgmma_{gv.name_hint}", self.sms)
            except UnsupportedGemmError as why:
                log.debug("%s stays with the schedule rules: %s", gv.name_hint, why)
                continue
            kernels.append(kernel)
            launchers[gv] = launcher(func, kernel)
        if not kernels:
            return mod
        log.info("wgmma: %d GEMM kernels", len(kernels))
        module = compile_kernels(kernels)
        result = tvm.IRModule(
            {gv: launchers.get(gv, func) for gv, func in mod.functions_items()},
            attrs=mod.attrs,
            global_infos=mod.global_infos,
        )
        return result.with_attr("external_mods", [*external_modules(result), module])


def external_modules(mod: tvm.IRModule) -> list[Any]:
    """The runtime modules attached to ``mod`` for ``tvm.compile`` to link (``external_mods``)."""
    return list(mod.attrs["external_mods"]) if mod.attrs and "external_mods" in mod.attrs else []

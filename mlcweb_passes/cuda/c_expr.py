"""TIR expressions as C++: the text of a generated CUDA kernel's addressing and epilogue."""

from __future__ import annotations

from typing import Any

import tvm
from tvm import tirx

from .._tir import buffer_loads, dtype_of

__all__ = ["C_TYPES", "CExprPrinter", "UnsupportedExprError", "dtype_of"]

_LOAD = tvm.ir.TensorLoad
C_TYPES = {"float16": "half", "float32": "float", "int32": "int", "int64": "long long"}
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


class UnsupportedExprError(Exception):
    """The expression has no C++ form here (a free variable, an op the printer does not know)."""


class CExprPrinter:
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
        index = dtype_of(e) in _INDEX_TYPES
        return self._emit(self.analyzer.simplify(e) if index else e, index)

    def _emit(self, e: Any, simplified: bool) -> str:
        def child(x: Any) -> str:
            return self._emit(x, True) if simplified else self(x)

        if isinstance(e, tirx.Var):
            for var, name in self.names.items():
                if var.same_as(e):
                    return name
            raise UnsupportedExprError(f"free variable {e}")
        if isinstance(e, tirx.IntImm):
            return str(int(e.value)) if dtype_of(e) != "bool" else ("true" if e.value else "false")
        if isinstance(e, tirx.FloatImm):
            text = f"{float(e.value)!r}f"
            return f"__float2half({text})" if dtype_of(e) == "float16" else text
        if isinstance(e, tirx.Cast):
            return self._cast(dtype_of(e), dtype_of(e.value), child(e.value))
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
            fn = _MIN_MAX.get(dtype_of(e), ("min", "max"))[isinstance(e, tirx.Max)]
            return f"{fn}({child(e.a)}, {child(e.b)})"
        if isinstance(e, tirx.Select):
            return f"({child(e.condition)} ? {child(e.true_value)} : {child(e.false_value)})"
        if isinstance(e, _LOAD):
            return self._load(e)
        if isinstance(e, tvm.ir.Call):
            return self._call(e, child)
        raise UnsupportedExprError(f"expression {type(e).__name__}")

    def _truncates_as_floor(self, e: Any) -> bool:
        """Whether C's truncating ``/`` and ``%`` give ``e``'s floor division: both operands non-negative."""
        return bool(self.analyzer.can_prove(e.a >= 0) and self.analyzer.can_prove(e.b > 0))

    def _cast(self, to: str, frm: str, text: str) -> str:
        if to == frm:
            return text
        if to not in C_TYPES:
            raise UnsupportedExprError(f"cast to {to}")
        if to == "float16":
            return f"__float2half((float)({text}))" if frm != "float32" else f"__float2half({text})"
        if frm == "float16":
            return f"(({C_TYPES[to]})__half2float({text}))"
        return f"(({C_TYPES[to]})({text}))"

    def _load(self, e: Any) -> str:
        if self.acc is not None and e.source.same_as(self.acc):
            return "acc1" if any(e.same_as(load) for load in self.acc1) else "acc"
        for buf, name in self.buffers.items():
            if buf.same_as(e.source):
                return f"{name}[{self.offset(buf, list(e.indices))}]"
        raise UnsupportedExprError(f"load of {e.source}, not a parameter")

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
        if name in _FLOAT_CALLS and dtype_of(e) == "float32":
            arg = child(e.args[0])
            return f"(1.f / (1.f + expf(-({arg}))))" if name == "tirx.sigmoid" else f"{_FLOAT_CALLS[name]}({arg})"
        raise UnsupportedExprError(f"call {name}")

"""Declare WebGPU storage buffers that a kernel only reads in aligned 4-wide vectors as ``array<vec4<T>>``.

TVM's WebGPU code generator declares every storage buffer as an array of its scalar type, so a 4-wide
load that a schedule vectorised (``x[T.Ramp(i, 1, 4)]``: each GEMM tile copy along a contiguous
reduction) becomes four scalar loads rebuilt into a vector, ``vec4<f16>(x[i], x[i + 1], x[i + 2],
x[i + 3])``. TVM's ``PointerValueTypeRewrite`` would retype such a buffer, but in TVM 0.27 it skips the
``decl_buffer``-declared parameters of split device kernels. A hand-written GEMM measured 12-16% slower
built that way than with ``vec4`` elements (``benchmarks/webgpu/f16_math.mjs``, H100).

:func:`vector_storage` rewrites one device kernel: a pointer parameter whose buffer is one-dimensional,
a multiple of ``lanes`` long and only loaded (never stored) through ``Ramp(base, 1, lanes)`` indices with
``base`` provably a multiple of ``lanes`` becomes a pointer to ``T x lanes``, its buffer ``lanes`` times
shorter and each load ``buf[base / lanes]``. Anything else (a scalar read, a store, an unaligned or
unprovable base) leaves that buffer as it was. The bytes are the same; the host passes the same pointer.

:class:`WebGPUVectorStorage` applies it to every kernel of a device module; it runs after TVM's device
finalisation (:data:`TIR_PIPELINE`, registered by :func:`tir_pipeline`), once indices are simplified.
"""

from __future__ import annotations

from typing import Any

import tvm
import tvm.sym as sym
import tvm_ffi
from tvm import tirx

from .._relax import ModulePassBase

__all__ = ["TIR_PIPELINE", "WebGPUVectorStorage", "tir_pipeline", "vector_storage"]

TIR_PIPELINE = "mlcweb_webgpu_vector_storage"


def _aligned_vector_index(index: Any, lanes: int, analyzer: Any) -> bool:
    if not isinstance(index, tirx.Ramp) or int(index.lanes) != lanes:
        return False
    stride = index.stride
    if not isinstance(stride, tirx.IntImm) or int(stride) != 1:
        return False
    known = analyzer.modular_set(index.base)
    return int(known.coeff) % lanes == 0 and int(known.base) % lanes == 0


def _vector_candidates(func: tirx.PrimFunc, lanes: int) -> dict[Any, Any]:
    """{pointer parameter: its declared buffer} for the buffers only read in aligned ``lanes``-wide
    vectors."""
    params = [p for p in func.params if isinstance(p.ty, tvm.ir.PointerType)]
    declared: dict[Any, Any] = {}

    def on_decl(node: Any) -> None:
        for p in params:
            if node.data.same_as(p):
                declared[p] = node.buffer

    tvm_ffi.structural_walk(func.body, ((tirx.DeclBuffer, on_decl),))
    analyzer = sym.Analyzer()
    usable = {
        p: len(b.shape) == 1 and isinstance(b.shape[0], tirx.IntImm) and int(b.shape[0]) % lanes == 0
        for p, b in declared.items()
    }

    def on_access(node: Any) -> None:
        load = isinstance(node, tvm.ir.TensorLoad)
        buffer = node.source if load else node.buffer
        for p, b in declared.items():
            if b.same_as(buffer):
                usable[p] = usable[p] and load and len(node.indices) == 1
                usable[p] = usable[p] and _aligned_vector_index(node.indices[0], lanes, analyzer)

    tvm_ffi.structural_walk(func.body, ((tvm.ir.TensorLoad, on_access), (tirx.BufferStore, on_access)))
    return {p: declared[p] for p, ok in usable.items() if ok}


def vector_storage(func: tirx.PrimFunc, lanes: int = 4) -> tirx.PrimFunc:
    """``func`` (a split device kernel) with its vector-only read buffers retyped (module docstring)."""
    candidates = _vector_candidates(func, lanes)
    if not candidates:
        return func
    analyzer = sym.Analyzer()
    retyped: list[tuple[Any, Any, Any]] = []  # (old buffer, new pointer parameter, new buffer)
    new_params: dict[Any, Any] = {}
    for param, buffer in candidates.items():
        dtype = f"{buffer.dtype}x{lanes}"
        pointer = tirx.Var(param.name, tvm.ir.PointerType(tvm.ir.PrimType(dtype), "global"))
        retyped.append((buffer, pointer, tirx.decl_buffer((int(buffer.shape[0]) // lanes,), dtype, buffer.name)))
        new_params[param] = pointer

    def match(buffer: Any) -> tuple[Any, Any, Any] | None:
        return next((r for r in retyped if r[0].same_as(buffer)), None)

    def on_decl(node: Any, mutator: Any) -> Any:
        hit = match(node.buffer)
        return tirx.DeclBuffer(hit[2], data=hit[1]) if hit else mutator.default_mutate(node)

    def on_load(node: Any, mutator: Any) -> Any:
        hit = match(node.source)
        if hit is None:
            return mutator.default_mutate(node)
        base = mutator.mutate(node.indices[0].base)
        # exact: base is a multiple of lanes, and an index is never negative
        return tirx.BufferLoad(hit[2], [analyzer.simplify(tirx.truncdiv(base, lanes))])

    body = tvm_ffi.structural_mutate(func.body, ((tirx.DeclBuffer, on_decl), (tvm.ir.TensorLoad, on_load)))
    params = [new_params.get(p, p) for p in func.params]
    return tirx.PrimFunc(params, body, func.ret_type, func.attrs)


@tvm.transform.module_pass(opt_level=0, name="mlcweb.WebGPUVectorStorage")
class WebGPUVectorStorage(ModulePassBase):
    """:func:`vector_storage` on every kernel of a (split) WebGPU device module."""

    def __init__(self, lanes: int = 4) -> None:
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        functions = {
            gv: vector_storage(f, self.lanes) if isinstance(f, tirx.PrimFunc) else f for gv, f in mod.functions_items()
        }
        return tvm.IRModule(functions, attrs=mod.attrs)


def tir_pipeline() -> str:
    """The name of TVM's default TIR pipeline with :class:`WebGPUVectorStorage` after the device
    finalisation, registered on first use; pass it as ``tvm.compile(..., tir_pipeline=...)``."""
    pipelines = tvm.tirx.compilation_pipeline.PIPELINE_MAP
    if TIR_PIPELINE not in pipelines:
        default = pipelines["s_tir"]

        def factory(**kwargs: Any) -> Any:
            pipeline, host_passes, device_passes = default(**kwargs)

            def with_vector_storage() -> tvm.transform.Pass:
                return tvm.transform.Sequential([device_passes(), WebGPUVectorStorage()])

            return pipeline, host_passes, with_vector_storage

        tvm.tirx.register_tir_pipeline(TIR_PIPELINE, factory)
    return TIR_PIPELINE

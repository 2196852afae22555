"""Float16 GEMMs on WebGPU's subgroup matrices (tensor cores), generated from each fused PrimFunc.

WebGPU's portable kernels multiply-add on the GPU's scalar lanes: on an H100 through Dawn the best of them
reach about half the float32 peak. Where the adapter offers ``chromium-experimental-subgroup-matrix``
with float16 operands and float32 results (Vulkan's cooperative matrices, NVIDIA's tensor cores), this
module writes each float16 GEMM of a webgpu build (a PrimFunc :mod:`~mlcweb_passes.gemm_analysis`
accepts: a linear layer, an implicit-GEMM NHWC convolution, a split-K slice, with producers and an
elementwise epilogue) as a WGSL kernel on them:

- a workgroup of subgroups (8 by default) takes a ``rows x cols`` tile of one batch (:class:`MatrixTile`); each
  ``depth``-deep slice of the two operands is copied to workgroup memory in 4-wide vectors (the
  operand's addressing, a convolution's window and zero padding included, printed from the PrimFunc),
  rows padded by 8 halves; with :data:`PREFETCH` (the default) each slice is read into registers while
  the slice before is multiplied, and stored after the next barrier;
- each subgroup multiplies its share from there (the tile cut into the tile's ``grid`` of subgroups,
  4 x 2 by default), its results in float32 subgroup matrices;
- at the end each result matrix goes through a per-subgroup scratch in workgroup memory (shared by the
  subgroups in ``rounds`` turns where workgroup memory is short), and the subgroup's lanes apply the
  PrimFunc's epilogue (casts, bias, scale, residual) and store.

TVM's WebGPU code generator has no subgroup-matrix types, so these kernels do not replace the PrimFunc
in the module. :class:`PlanMatrixGemms` records a plan per PrimFunc (module attribute
:data:`PLANS_ATTR`), and after compilation :func:`matrix_kernels` writes each planned kernel's WGSL
with the bindings TVM's own kernel for that function declares (same buffers, same order), and the grid
it needs. The page swaps them in for TVM's shaders when the adapter offers the configuration, and keeps
TVM's (the portable kernels) when it does not.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import tvm
from tvm import tirx

from .._relax import ModulePassBase
from .._tir import SCHEDULED_ATTR, dtype_of
from ..cuda.c_expr import CExprPrinter, UnsupportedExprError
from ..gemm_analysis import Gemm, Operand, UnsupportedGemmError, analyze_gemm_func, flatten_axes, output_value
from ..targets import gpu_facts
from .flash_attention import WEBGPU_DEFAULT_SHARED

__all__ = [
    "PLANS_ATTR",
    "MatrixConfig",
    "MatrixKernel",
    "MatrixPlan",
    "MatrixTile",
    "PlanMatrixGemms",
    "PlanMatrixKernels",
    "WGSLExprPrinter",
    "bind_helpers",
    "choose_matrix_tile",
    "gemm_key",
    "matrix_kernels",
    "plan_matrix_gemm",
    "plans_attr",
    "workgroup_limit",
    "write_kernels",
]

log = logging.getLogger(__name__)

PLANS_ATTR = "mlcweb.matrix_gemms"  # module attribute: {PrimFunc name: MatrixPlan as JSON}
PAD = 8  # halves of padding a workgroup-memory row: rows 16-byte aligned, a subgroup's rows in distinct banks
WGSL_TYPES = {"float16": "f16", "float32": "f32", "int32": "i32", "int64": "i32", "bool": "bool"}


@dataclass(frozen=True)
class MatrixConfig:
    """A subgroup-matrix configuration (``GPUSubgroupMatrixConfig``): ``m x k`` float16 left and ``k x n``
    right operands into an ``m x n`` float32 result, on subgroups of ``subgroup_size`` lanes."""

    m: int = 16
    n: int = 16
    k: int = 16
    subgroup_size: int = 32

    def manifest(self) -> dict[str, Any]:
        """The manifest's description: what the page matches against the adapter's configurations."""
        return {
            "componentType": "f16",
            "resultComponentType": "f32",
            "M": self.m,
            "N": self.n,
            "K": self.k,
            "subgroup_size": self.subgroup_size,
        }


@dataclass(frozen=True)
class MatrixTile:
    """A workgroup's share of a GEMM: ``rows x cols`` outputs, walking the reduction ``depth`` at a time,
    on ``grid`` subgroups (rows x columns of shares); ``rounds``: the epilogue's scratch holds the result
    matrices of ``1 / rounds`` of the subgroups at a time (less workgroup memory for deeper tiles);
    ``min_waves``: the tile is taken only for GEMMs where it makes at least this many waves of workgroups
    (large tiles leave small grids with idle multiprocessors)."""

    rows: int = 64
    cols: int = 128
    depth: int = 32
    grid: tuple[int, int] = (4, 2)
    rounds: int = 1
    min_waves: float = 0.0

    @property
    def subgroups(self) -> int:
        return self.grid[0] * self.grid[1]

    def shared_bytes(self, config: MatrixConfig) -> int:
        """Workgroup memory: the two operand slices (float16, padded rows) and the float32 scratch."""
        scratch = self.subgroups // self.rounds * config.m * config.n
        return 2 * (self.rows + self.cols) * (self.depth + PAD) + 4 * scratch

    def fits(self, config: MatrixConfig) -> bool:
        """Whole subgroup matrices in each subgroup's share, whole 4-wide copies for every lane, and the
        scratch's turns dividing the subgroups."""
        (gr, gc), lanes = self.grid, self.subgroups * config.subgroup_size
        shares = self.rows % (gr * config.m) == 0 and self.cols % (gc * config.n) == 0
        copies = all((r * self.depth // 4) % lanes == 0 for r in (self.rows, self.cols))
        return shares and copies and self.depth % config.k == 0 and self.subgroups % self.rounds == 0

    def spec(self) -> str:
        """``ROWSxCOLSxDEPTH[/GRxGC][/rROUNDS][/wWAVES]``, as :meth:`parse` reads it."""
        grid = f"/{self.grid[0]}x{self.grid[1]}" if self.grid != (4, 2) else ""
        rounds = f"/r{self.rounds}" if self.rounds > 1 else ""
        waves = f"/w{self.min_waves:g}" if self.min_waves else ""
        return f"{self.rows}x{self.cols}x{self.depth}{grid}{rounds}{waves}"

    @staticmethod
    def parse(text: str) -> MatrixTile:
        """A tile from its :meth:`spec` (``64x128x64/r2``, ``64x128x32/2x2``, ``128x128x64/w1``); raises
        ValueError."""
        match = re.fullmatch(r"(\d+)x(\d+)x(\d+)(?:/(\d+)x(\d+))?(?:/r(\d+))?(?:/w(\d+(?:\.\d+)?))?", text.strip())
        if match is None:
            wanted = "ROWSxCOLSxDEPTH[/GRxGC][/rROUNDS][/wWAVES] (e.g. 64x128x32, 64x128x64/r2, 128x128x64/w1)"
            raise ValueError(f"tile {text!r} is not {wanted}")
        rows, cols, depth, gr, gc, rounds, waves = match.groups()
        grid = (int(gr), int(gc)) if gr else (4, 2)
        return MatrixTile(int(rows), int(cols), int(depth), grid, int(rounds or 1), float(waves or 0))


# Tiles in order of preference, 64 rows (each subgroup a 16-row share): in the model on an H100 they beat
# 128-row tiles (UNet step 47.6 against 50.4 ms, VAE 30.5 against 32.6, same machine session;
# benchmarks/results/2026-12-06-h100-sd_webgpu-9.md), as matrix_gemm.mjs had timed on single GEMMs.
TILE_ORDER = (MatrixTile(64, 128, 32), MatrixTile(64, 64, 32), MatrixTile(64, 32, 32))
# Where a GEMM makes at most a wave of workgroups (one per multiprocessor), its tile walks the reduction
# this deep: fewer barriers per multiply-add, where no other workgroup hides them. On an H100, 64-deep
# tiles made such GEMMs 5-26% faster (2 x 512 x 1280 linears, 4 x 128 x 1280 split-K slices) and larger
# grids 10-50% slower (benchmarks/results/2026-12-06-h100-sd_webgpu-11.md).
ONE_WAVE_DEPTH = 64
# Each slice's operands read into registers while the slice before is multiplied (then copied to workgroup
# memory after the next barrier), so a workgroup's global loads overlap its own multiply-adds instead of
# waiting for other resident workgroups to hide them; costs a register per two halves a lane copies.
PREFETCH = True


def plans_attr(shared: int | None = None) -> str:
    """The module attribute holding the GEMM plans: :data:`PLANS_ATTR` for the build's own table (the
    target's workgroup memory), ``PLANS_ATTR@BYTES`` for a table planned within ``shared`` bytes, for
    adapters that grant that much."""
    return PLANS_ATTR if shared is None else f"{PLANS_ATTR}@{shared}"


def gemm_key(batch: int, m: int, n: int, k: int) -> str:
    """A GEMM's key in a tuned tile table (:mod:`~mlcweb_passes.webgpu.matrix_tiles`): ``BxMxNxK``."""
    return f"{batch}x{m}x{n}x{k}"


def workgroup_limit(target: tvm.target.Target, max_shared: int | None = None) -> int:
    """The workgroup memory matrix kernels are planned within: ``max_shared`` where given, else the
    target's ``max_shared_memory_per_block`` (WebGPU's default limit where the target does not say)."""
    return max_shared or int(target.attrs.get("max_shared_memory_per_block", WEBGPU_DEFAULT_SHARED))


def _fits_columns(tile: MatrixTile, n: int, config: MatrixConfig, max_shared: int) -> bool:
    """``tile``'s columns divide ``n`` with whole subgroup matrices a subgroup, within ``max_shared``."""
    return n % tile.cols == 0 and tile.fits(config) and tile.shared_bytes(config) <= max_shared


def _usable(tile: MatrixTile, m: int, n: int, k: int, config: MatrixConfig, max_shared: int) -> bool:
    """``tile`` divides the GEMM (its last row tile may be partial) and fits ``max_shared`` bytes."""
    return k % tile.depth == 0 and m >= tile.rows and _fits_columns(tile, n, config, max_shared)


def choose_matrix_tile(
    m: int,
    n: int,
    k: int,
    config: MatrixConfig,
    max_shared: int = WEBGPU_DEFAULT_SHARED,
    order: tuple[MatrixTile, ...] = TILE_ORDER,
    wave: int = 0,
    batch: int = 1,
    tuned: Mapping[str, MatrixTile] | None = None,
) -> MatrixTile:
    """The tile ``tuned`` (a tile table, :func:`gemm_key` -> tile) gives this GEMM where it divides it
    and fits ``max_shared``; else the first tile of ``order`` whose columns divide ``n`` with whole
    subgroup matrices per subgroup, within ``max_shared`` bytes, its depth made shallower (32, then
    ``config.k``) where ``k`` is not a multiple of it, and that makes at least its ``min_waves`` waves of
    ``wave`` workgroups; of those, the first whose rows divide ``m``, else (CLIP's and the
    cross-attention projections' 2 x 77 tokens) the first, its last row tile partial. Where ``batch``
    GEMMs on that tile make at most ``wave`` workgroups, the tile walks :data:`ONE_WAVE_DEPTH` deep if
    ``k`` allows (the epilogue's scratch in turns where workgroup memory needs it). Raises
    :class:`UnsupportedGemmError` where none fits."""
    measured = (tuned or {}).get(gemm_key(batch, m, n, k))
    if measured is not None and _usable(measured, m, n, k, config, max_shared):
        return measured
    fitting = []
    for template in order:
        depth = next((d for d in (template.depth, 32, config.k) if k % d == 0 and d <= template.depth), None)
        if depth is None:
            continue
        tile = replace(template, depth=depth)
        grid = batch * -(-m // tile.rows) * (n // tile.cols)
        if grid < tile.min_waves * wave:
            continue
        if _fits_columns(tile, n, config, max_shared):
            fitting.append(tile)
    if not fitting and k % config.k:
        raise UnsupportedGemmError(f"reduction of {k} is not a multiple of {config.k}")
    whole = [tile for tile in fitting if m % tile.rows == 0]
    if not (whole or (fitting and m >= fitting[0].rows)):
        raise UnsupportedGemmError(f"no tile divides {m} x {n}")
    tile = (whole or fitting)[0]
    if batch * -(-m // tile.rows) * (n // tile.cols) > wave or tile.depth >= ONE_WAVE_DEPTH or k % ONE_WAVE_DEPTH:
        return tile
    for rounds in (tile.rounds, 2 * tile.rounds):
        deep = replace(tile, depth=ONE_WAVE_DEPTH, rounds=rounds)
        if deep.fits(config) and deep.shared_bytes(config) <= max_shared:
            return deep
    return tile


class WGSLExprPrinter(CExprPrinter):
    """TIR expressions as WGSL: :class:`~mlcweb_passes.cuda.c_expr.CExprPrinter` with WGSL's literals,
    conversions, ``select`` and built-ins. Integer expressions print as ``i32`` (every buffer of a planned
    kernel has fewer than 2**31 elements); a buffer element is read through the function
    ``mlcweb_get_<buffer>(offset)``, written once its binding's type is known (scalar or 4-wide)."""

    def _emit(self, e: Any, simplified: bool) -> str:
        def child(x: Any) -> str:
            return self._emit(x, True) if simplified else self(x)

        if isinstance(e, tirx.IntImm):
            if dtype_of(e) == "bool":
                return "true" if e.value else "false"
            return f"{int(e.value)}i"
        if isinstance(e, tirx.FloatImm):
            suffix = {"float16": "h", "float32": "f"}.get(dtype_of(e))
            if suffix is None:
                raise UnsupportedExprError(f"{dtype_of(e)} constant")
            return f"{float(e.value)!r}{suffix}"
        if isinstance(e, tirx.FloorDiv | tirx.FloorMod) and not self._truncates_as_floor(e):
            a, b = child(e.a), child(e.b)
            quotient = (
                f"select(({a}) / ({b}), ({a}) / ({b}) - 1i, (({a}) % ({b}) != 0i) && ((({a}) < 0i) != (({b}) < 0i)))"
            )
            return quotient if isinstance(e, tirx.FloorDiv) else f"(({a}) - {quotient} * ({b}))"
        if isinstance(e, tirx.Min | tirx.Max):
            return f"{'max' if isinstance(e, tirx.Max) else 'min'}({child(e.a)}, {child(e.b)})"
        if isinstance(e, tirx.Select):
            return f"select({child(e.false_value)}, {child(e.true_value)}, {child(e.condition)})"
        return super()._emit(e, simplified)

    def _cast(self, to: str, frm: str, text: str) -> str:
        wgsl_to, wgsl_from = WGSL_TYPES.get(to), WGSL_TYPES.get(frm)
        if wgsl_to is None or wgsl_from is None:
            raise UnsupportedExprError(f"cast from {frm} to {to}")
        return text if wgsl_to == wgsl_from else f"{wgsl_to}({text})"

    def _load(self, e: Any) -> str:
        if self.acc is not None and e.source.same_as(self.acc):
            if any(e.same_as(load) for load in self.acc1):
                raise UnsupportedExprError("an epilogue over column pairs")
            return "acc"
        for buf, name in self.buffers.items():
            if buf.same_as(e.source):
                return f"mlcweb_get_{name}({self.offset(buf, list(e.indices))})"
        raise UnsupportedExprError(f"load of {e.source}, not a parameter")

    def _call(self, e: Any, child: Any) -> str:
        name = e.op.name
        if name in ("prim.if_then_else", "tirx.if_then_else"):
            cond, a, b = e.args
            return f"select({child(b)}, {child(a)}, {child(cond)})"
        if name in ("tirx.exp", "tirx.tanh", "tirx.sqrt") and dtype_of(e) in ("float32", "float16"):
            return f"{name.split('.')[-1]}({child(e.args[0])})"
        if name == "tirx.sigmoid" and dtype_of(e) == "float32":
            return f"(1.0f / (1.0f + exp(-({child(e.args[0])}))))"
        raise UnsupportedExprError(f"call {name}")


@dataclass(frozen=True)
class MatrixPlan:
    """A planned kernel, WGSL still to be bound to TVM's buffer names: the GEMM's sizes, its tile, the
    PrimFunc's parameter names (the names TVM's WGSL gives their bindings) and three WGSL functions,
    with ``{P0}``, ``{P1}``... for parameter ``i``'s binding (elements read through ``mlcweb_get_{Pi}``
    and ``mlcweb_get4_{Pi}``, defined with the binding): ``mlcweb_a(s, m, k)`` and
    ``mlcweb_b(s, n, k)`` returning 4 operand elements from ``k`` on, ``mlcweb_out(s, m, n, acc)``
    applying the epilogue to the accumulator ``acc`` and storing. ``prefetch``: each slice's operands are
    read a slice ahead, into registers (:data:`PREFETCH`)."""

    batch: int
    m: int
    n: int
    k: int
    tile: MatrixTile
    params: tuple[str, ...]
    helpers: str
    prefetch: bool = False  # the next slice's operands read into registers during this one's products

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> MatrixPlan:
        data = json.loads(text)
        tile = data["tile"]
        data["tile"] = MatrixTile(**{**tile, "grid": tuple(tile["grid"])})
        data["params"] = tuple(data["params"])
        return MatrixPlan(**data)


_FLAT = {"s": "gemm_s", "m": "gemm_m", "n": "gemm_n", "k": "gemm_k"}


def plan_matrix_gemm(
    func: tirx.PrimFunc,
    config: MatrixConfig,
    max_shared: int = WEBGPU_DEFAULT_SHARED,
    tiles: tuple[MatrixTile, ...] = TILE_ORDER,
    wave: int = 0,
    tuned: Mapping[str, MatrixTile] | None = None,
) -> MatrixPlan:
    """The subgroup-matrix kernel for ``func``, its tile the first of ``tiles`` that fits (deeper for a
    GEMM of at most ``wave`` workgroups, :func:`choose_matrix_tile`); raises
    :class:`UnsupportedGemmError` when it has none:
    not a float16 GEMM of :mod:`~mlcweb_passes.gemm_analysis`'s kind, sizes no tile divides, an
    epilogue over column pairs or with an operation WGSL lacks (``erf``)."""
    found = analyze_gemm_func(func)
    gemm = found.gemm
    sizes = gemm.sizes
    tile = choose_matrix_tile(sizes["m"], sizes["n"], sizes["k"], config, max_shared, tiles, wave, sizes["s"], tuned)
    if any(str(p.dtype) not in WGSL_TYPES or str(p.dtype) == "bool" for p in func.params):
        raise UnsupportedGemmError("a parameter of a type the kernel does not take")
    params = tuple(str(p.name) for p in func.params)
    if len(set(params)) != len(params) or set(params) & {*_FLAT.values(), "acc"}:
        raise UnsupportedGemmError("parameter names clash")
    try:
        helpers = _helpers(func, gemm, found.last)
    except UnsupportedExprError as err:
        raise UnsupportedGemmError(str(err)) from err
    return MatrixPlan(sizes["s"], sizes["m"], sizes["n"], sizes["k"], tile, params, helpers, PREFETCH)


def _helpers(func: tirx.PrimFunc, gemm: Gemm, last: Any) -> str:
    analyzer, flat = flatten_axes(gemm.groups)
    names = {var: _FLAT[key] for var, key in flat.items()}
    placeholders = {p: f"{{P{i}}}" for i, p in enumerate(func.params)}
    printer = WGSLExprPrinter(names, placeholders, analyzer, acc=gemm.store.buffer)
    out = func.params[-1]
    value, write, acc1, paired = output_value(gemm, last, analyzer, out)
    if paired or acc1:
        raise UnsupportedGemmError("an epilogue over column pairs")
    if str(out.dtype) not in ("float16", "float32"):
        raise UnsupportedGemmError(f"output dtype {out.dtype}")
    text = "\n".join(
        [
            _operand_fn("mlcweb_a", "gemm_m", gemm.x, printer, placeholders),
            _operand_fn("mlcweb_b", "gemm_n", gemm.y, printer, placeholders),
            "fn mlcweb_out(gemm_s : i32, gemm_m : i32, gemm_n : i32, acc : f32) {",
            f"  mlcweb_set_{placeholders[out]}({printer.offset(out, write)}, {printer(value)});",
            "}",
        ]
    )
    return text


def _operand_fn(name: str, rows: str, operand: Operand, printer: WGSLExprPrinter, buffers: dict[Any, str]) -> str:
    """``fn name(gemm_s, rows, gemm_k) -> vec4<f16>``: 4 elements of the operand from ``gemm_k`` on (the
    reduction axis is innermost and unit-stride; zeros where the operand's condition is false)."""
    base = next((text for buf, text in buffers.items() if buf.same_as(operand.buffer)), None)
    if base is None:
        raise UnsupportedGemmError("operand is computed in the kernel")
    offset = printer.offset(operand.buffer, operand.indices)
    body = [f"  let v = mlcweb_get4_{base}(max({offset}, 0i) / 4i);"]
    if operand.condition is not None:
        body.append(f"  return select(vec4<f16>(), v, {printer(operand.condition)});")
    else:
        body.append("  return v;")
    return "\n".join([f"fn {name}(gemm_s : i32, {rows} : i32, gemm_k : i32) -> vec4<f16> {{", *body, "}"])


class PlanMatrixKernels(ModulePassBase):
    """The planning half of a subgroup-matrix kernel family: for each PrimFunc :meth:`wants`, the plan
    :meth:`plan` makes (as JSON), into the module attribute ``attr``; PrimFuncs it cannot plan keep their
    portable kernel alone (logged). WebGPU targets only; the module is otherwise unchanged."""

    attr = ""
    what = "kernels"

    def __init__(self, config: MatrixConfig, max_shared: int | None = None) -> None:
        self.config = config
        self.max_shared = max_shared  # None: the target's max_shared_memory_per_block

    def wants(self, func: tirx.PrimFunc) -> bool:
        raise NotImplementedError

    def plan(self, func: tirx.PrimFunc, max_shared: int, target: tvm.target.Target) -> str:
        raise NotImplementedError

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        target = tvm.target.Target.current(allow_none=True)
        if target is None or target.kind.name != "webgpu":
            return mod
        limit = workgroup_limit(target, self.max_shared)
        plans: dict[str, str] = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or not self.wants(func):
                continue
            try:
                plans[gv.name_hint] = self.plan(func, limit, target)
            except UnsupportedGemmError as why:
                log.debug("%s keeps its portable kernel only: %s", gv.name_hint, why)
        log.info("subgroup matrices: %d %s planned", len(plans), self.what)
        return mod.with_attr(self.attr, plans) if plans else mod


@tvm.transform.module_pass(opt_level=0, name="mlcweb.PlanMatrixGemms")
class PlanMatrixGemms(PlanMatrixKernels):
    """Plan a subgroup-matrix kernel for every float16 GEMM PrimFunc (WebGPU only; the module is otherwise
    unchanged): the plans go to the module attribute :data:`PLANS_ATTR`, for :func:`matrix_kernels` after
    compilation. See the module docstring."""

    attr = PLANS_ATTR
    what = "GEMM kernels"

    def __init__(
        self,
        config: MatrixConfig,
        max_shared: int | None = None,
        tiles: tuple[MatrixTile, ...] = TILE_ORDER,
        wave: int | None = None,
        tuned: Mapping[str, MatrixTile] | None = None,
        attr: str = PLANS_ATTR,
    ) -> None:
        super().__init__(config, max_shared)
        self.attr = attr  # plans_attr(max_shared) for a table beside the build's own (larger workgroup memory)
        self.tiles = tiles  # in order of preference (choose_matrix_tile)
        self.wave = wave  # workgroups a GPU runs at once; None: the target's multiprocessors (gpu_facts)
        self.tuned = tuned  # measured tiles by gemm_key (webgpu.matrix_tiles), taken first where they fit

    def wants(self, func: tirx.PrimFunc) -> bool:
        return SCHEDULED_ATTR not in func.attrs

    def plan(self, func: tirx.PrimFunc, max_shared: int, target: tvm.target.Target) -> str:
        wave = gpu_facts(target).sm_count if self.wave is None else self.wave
        return plan_matrix_gemm(func, self.config, max_shared, self.tiles, wave, self.tuned).to_json()


@dataclass(frozen=True)
class MatrixKernel:
    """A kernel that replaces TVM's shader ``name``: its WGSL and the workgroups to dispatch."""

    name: str
    code: str
    grid: tuple[int, int, int]


_BINDING = re.compile(
    r"^@group\(0\) @binding\((\d+)\)\s*var<storage,\s*(read|read_write)>\s*(\w+)\s*:\s*(array<[^;]*>);", re.M
)


def matrix_kernels(
    plans: dict[str, str], sources: dict[str, str], config: MatrixConfig, emulate: bool = False
) -> dict[str, MatrixKernel]:
    """Each planned function's kernel, by the name of the TVM shader it replaces (``<function>_kernel``,
    whose storage bindings it declares as TVM does). ``sources``: TVM's WGSL by shader name
    (:func:`mlcweb.wgsl_check.wgsl_sources`). A plan whose shader is missing, or whose bindings do not
    name every parameter it reads, is left out (logged).

    ``emulate``: the same kernels with each subgroup-matrix load, multiply-add and store done by the
    subgroup's lanes on the same workgroup memory (subgroups taken as runs of ``subgroup_size``
    invocations): slow, but it runs on any adapter with shader-f16, so the generated addressing, epilogue,
    bindings and grid can be checked where no subgroup matrices are (tests, on lavapipe)."""
    return write_kernels(
        plans,
        sources,
        lambda shader, text, source: _kernel(shader, MatrixPlan.from_json(text), source, config, emulate),
    )


def write_kernels(
    plans: dict[str, str], sources: dict[str, str], write: Callable[[str, str, str], MatrixKernel]
) -> dict[str, MatrixKernel]:
    """``write(shader, plan, TVM's source of the shader)`` for each planned function whose shader
    (``<function>_kernel``) is in ``sources``, by shader name; a plan whose shader is missing or that
    ``write`` refuses (:class:`UnsupportedGemmError`: a binding TVM's shader lacks) is left out (logged)."""
    kernels: dict[str, MatrixKernel] = {}
    for func, text in sorted(plans.items()):
        shader = f"{func}_kernel"
        if shader not in sources:
            log.info("%s: no shader %s to replace", func, shader)
            continue
        try:
            kernels[shader] = write(shader, str(text), sources[shader])
        except UnsupportedGemmError as why:
            log.info("%s keeps TVM's shader: %s", shader, why)
    return kernels


def _kernel(shader: str, plan: MatrixPlan, tvm_source: str, config: MatrixConfig, emulate: bool) -> MatrixKernel:
    declarations, helpers = bind_helpers(plan.params, plan.helpers, tvm_source)
    code = _source(shader, plan, config, declarations, helpers, emulate)
    return MatrixKernel(shader, code, _grid(plan))


def bind_helpers(params: tuple[str, ...], helpers: str, tvm_source: str) -> tuple[str, str]:
    """A planned kernel's storage declarations (TVM's shader's, in binding order) and its ``helpers``
    with each ``{Pi}`` (parameter ``params[i]``) replaced by the name of TVM's binding for it and the
    accessors of those bindings (:func:`_accessors`) ahead of them; raises :class:`UnsupportedGemmError`
    where TVM's shader has no binding for a parameter the helpers read or write."""
    bindings = {m.group(3): m for m in _BINDING.finditer(tvm_source)}
    access = []
    for i, param in enumerate(params):
        if f"{{P{i}}}" not in helpers:
            continue
        name = next((n for n in (f"{param}_ptr", param) if n in bindings), None)  # TVM's: <buffer>_ptr
        if name is None:
            raise UnsupportedGemmError(f"TVM's shader has no binding for {param}")
        helpers = helpers.replace(f"{{P{i}}}", name)
        access.append(_accessors(name, bindings[name].group(4), bindings[name].group(2) == "read_write"))
    declarations = "\n".join(m.group(0) for m in sorted(bindings.values(), key=lambda m: int(m.group(1))))
    return declarations, "\n".join([*access, helpers])


def _accessors(name: str, array: str, writable: bool) -> str:
    """``mlcweb_get_<name>(i)`` (element ``i``), ``mlcweb_get4_<name>(i)`` (elements ``4i`` to ``4i + 3``) and,
    for a writable binding, ``mlcweb_set_<name>(i, v)``, over its declared ``array<T>`` or ``array<vec4<T>>``."""
    match = re.fullmatch(r"array<(vec4<)?(f16|f32|i32|u32)>?>", array.replace(" ", ""))
    if match is None:
        raise UnsupportedGemmError(f"binding {name} is {array}")
    vec4, scalar = match.group(1) is not None, match.group(2)
    if vec4:
        fns = [
            f"fn mlcweb_get_{name}(i : i32) -> {scalar} {{ return {name}[i / 4i][i % 4i]; }}",
            f"fn mlcweb_get4_{name}(i : i32) -> vec4<{scalar}> {{ return {name}[i]; }}",
        ]
        setter = f"{name}[i / 4i][i % 4i] = v;"
    else:
        four = ", ".join(f"{name}[4i * i + {lane}i]" for lane in range(4))
        fns = [
            f"fn mlcweb_get_{name}(i : i32) -> {scalar} {{ return {name}[i]; }}",
            f"fn mlcweb_get4_{name}(i : i32) -> vec4<{scalar}> {{ return vec4<{scalar}>({four}); }}",
        ]
        setter = f"{name}[i] = v;"
    if writable:
        fns.append(f"fn mlcweb_set_{name}(i : i32, v : {scalar}) {{ {setter} }}")
    return "\n".join(fns)


def _grid(plan: MatrixPlan) -> tuple[int, int, int]:
    return (plan.n // plan.tile.cols, plan.batch * -(-plan.m // plan.tile.rows), 1)


def _source(
    shader: str, plan: MatrixPlan, config: MatrixConfig, declarations: str, helpers: str, emulate: bool = False
) -> str:
    tile, sm, sn, sk = plan.tile, config.m, config.n, config.k
    (gr, gc), threads = tile.grid, tile.subgroups * config.subgroup_size
    wm, wn = tile.rows // gr, tile.cols // gc
    ti, tj = wm // sm, wn // sn
    lds = tile.depth + PAD
    result = f"subgroup_matrix_result<f32, {sn}, {sm}>"
    row_tiles = -(-plan.m // tile.rows)
    partial = plan.m % tile.rows != 0  # the last row tile: rows past m not stored (_operand_reads zeroes them)
    lines = [f"  var c{i}_{j} = {result}();" for i in range(ti) for j in range(tj)]
    if plan.prefetch:
        prefetch, body = _prefetched_copies(plan, threads)
    else:
        prefetch, body = [], ["    workgroupBarrier();", *_copies(plan, threads), "    workgroupBarrier();"]
    if emulate:  # one loop over the slice's steps: lavapipe compiles unrolled emulation slowly
        loop = f"    for (var kk = 0i; kk < {tile.depth}i; kk += {sk}i) {{"
        body += [loop, *_emulated_mma(ti, tj, lds, config), "    }"]
    else:
        body += _matrix_mma(ti, tj, tile.depth, lds, config)
    size = sm * sn
    share = tile.subgroups // tile.rounds  # subgroups whose result matrices the scratch holds at once
    slot = "sg" if tile.rounds == 1 else f"(sg % {share}u)"
    stores = []
    for i in range(ti):
        for j in range(tj):
            for turn in range(tile.rounds):
                mine = "" if tile.rounds == 1 else f"if (sg / {share}u == {turn}u) "
                stores += [
                    "  workgroupBarrier();",
                    f"  {mine}{{ "
                    + (
                        _emulated_store(i, j, slot, config)
                        if emulate
                        else f"subgroupMatrixStore(&mlcweb_cs, {slot} * {size}u, c{i}_{j}, false, {sn}u);"
                    )
                    + " }",
                    "  workgroupBarrier();",
                    f"  {mine}{{ for (var e = lane; e < {size}u; e += {config.subgroup_size}u) {{",
                    f"    let r = row0 + wm + {i * sm}i + i32(e / {sn}u);",
                    f"    {f'if (r < {plan.m}i) ' if partial else ''}"
                    f"{{ mlcweb_out(gemm_s, r, col0 + wn + {j * sn}i + i32(e % {sn}u),"
                    f" mlcweb_cs[{slot} * {size}u + e]); }}",
                    "  } }",
                ]
    if emulate:
        header = "enable f16;"
        builtins = "@builtin(local_invocation_index) li : u32"
        lanes = f"  let sg = li / {config.subgroup_size}u;\n  let lane = li % {config.subgroup_size}u;\n"
        lines = [f"  var c{i}_{j} : array<f32, {size // config.subgroup_size}>;" for i in range(ti) for j in range(tj)]
    else:
        header = (
            "enable f16;\nenable subgroups;\nenable chromium_experimental_subgroup_matrix;\n"
            "diagnostic(off, chromium_experimental.subgroup_matrix_uniformity);"
        )
        builtins = (
            "@builtin(local_invocation_index) li : u32,\n"
            "        @builtin(subgroup_id) sg : u32, @builtin(subgroup_invocation_id) lane : u32"
        )
        lanes = ""
    return f"""{header}
// mlcweb: {plan.batch} x {plan.m} x {plan.n} x {plan.k} on {sm}x{sn}x{sk} subgroup matrices,
// {tile.rows}x{tile.cols} tiles {tile.depth} deep on {gr}x{gc} subgroups{" (emulated by lanes)" if emulate else ""}
// tile {replace(tile, min_waves=0.0).spec()}
{declarations}
var<workgroup> mlcweb_as : array<f16, {tile.rows * lds}>;
var<workgroup> mlcweb_bs : array<f16, {tile.cols * lds}>;
var<workgroup> mlcweb_cs : array<f32, {share * size}>;
{helpers}
@compute @workgroup_size({threads}, 1, 1)
fn {shader}(@builtin(workgroup_id) wg : vec3<u32>, {builtins}) {{
{lanes}  let gemm_s = i32(wg.y / {row_tiles}u);
  let row0 = i32(wg.y % {row_tiles}u) * {tile.rows}i;
  let col0 = i32(wg.x) * {tile.cols}i;
  let wm = i32(sg / {gc}u) * {wm}i;
  let wn = i32(sg % {gc}u) * {wn}i;
{chr(10).join(lines + prefetch)}
  for (var k0 = 0i; k0 < {plan.k}i; k0 += {tile.depth}i) {{
{chr(10).join(body)}
  }}
{chr(10).join(stores)}
}}
"""


def _operand_reads(plan: MatrixPlan, threads: int, k0: str) -> list[tuple[str, str, str]]:
    """Each 4-wide copy a lane makes of the ``depth``-deep slice from ``k0`` (a WGSL expression) on:
    (workgroup array, WGSL offset in it, WGSL reading the 4 halves), A's copies then B's; where the last
    row tile is partial, A's rows past ``m`` read row ``m - 1`` (in bounds) and keep zeros."""
    tile, quads, lds = plan.tile, plan.tile.depth // 4, plan.tile.depth + PAD
    partial = plan.m % tile.rows != 0
    out = []
    for fn, buf, rows, origin in (
        ("mlcweb_a", "mlcweb_as", tile.rows, "row0"),
        ("mlcweb_b", "mlcweb_bs", tile.cols, "col0"),
    ):
        for copy in range(rows * tile.depth // 4 // threads):
            e = copy * threads  # the lane's copy: element li + e of the slice's 4-wide pieces
            r, q = f"((i32(li) + {e}i) / {quads}i)", f"((i32(li) + {e}i) % {quads}i)"
            if partial and fn == "mlcweb_a":
                row = f"min(row0 + {r}, {plan.m - 1}i)"
                read = f"select(vec4<f16>(), {fn}(gemm_s, {row}, {k0} + 4i * {q}), row0 + {r} < {plan.m}i)"
            else:
                read = f"{fn}(gemm_s, {origin} + {r}, {k0} + 4i * {q})"
            out.append((buf, f"{r} * {lds}i + 4i * {q}", read))
    return out


def _store4(buf: str, offset: str, value: str) -> str:
    """WGSL storing the 4 halves ``value`` to ``buf`` from ``offset`` on."""
    parts = " ".join(f"{buf}[o + {i}i] = {value}.{c};" for i, c in enumerate("xyzw"))
    return f"{{ let o = {offset}; {parts} }}"


def _copies(plan: MatrixPlan, threads: int) -> list[str]:
    """A slice's copies to workgroup memory, each read and stored in place (no prefetch)."""
    return [
        f"    {{ let v = {read}; {_store4(buf, offset, 'v')} }}"
        for buf, offset, read in _operand_reads(plan, threads, "k0")
    ]


def _prefetched_copies(plan: MatrixPlan, threads: int) -> tuple[list[str], list[str]]:
    """The prefetching copies: registers ``mlcweb_p<i>`` read from the first slice before the loop (first
    list); in the loop (second list) stored to workgroup memory between two barriers, then read from
    the next slice (where there is one) before this slice's products."""
    reads = _operand_reads(plan, threads, "0i")
    before = [f"  var mlcweb_p{i} = {read};" for i, (_, _, read) in enumerate(reads)]
    body = ["    workgroupBarrier();"]
    body += [f"    {_store4(buf, offset, f'mlcweb_p{i}')}" for i, (buf, offset, _) in enumerate(reads)]
    body += [
        "    workgroupBarrier();",
        f"    if (k0 + {plan.tile.depth}i < {plan.k}i) {{",
        f"      let k1 = k0 + {plan.tile.depth}i;",
    ]
    body += [f"      mlcweb_p{i} = {read};" for i, (_, _, read) in enumerate(_operand_reads(plan, threads, "k1"))]
    body.append("    }")
    return before, body


def _matrix_mma(ti: int, tj: int, depth: int, lds: int, config: MatrixConfig) -> list[str]:
    """Each subgroup's loads and multiply-adds of a ``depth``-deep slice, unrolled over its
    ``config.k``-deep steps: ``ti`` left and ``tj`` right operands from workgroup memory per step."""
    sm, sn, sk = config.m, config.n, config.k
    left = f"subgroup_matrix_left<f16, {sk}, {sm}>"
    right = f"subgroup_matrix_right<f16, {sn}, {sk}>"
    out = []
    for kk in range(0, depth, sk):
        for i in range(ti):
            at = f"u32((wm + {i * sm}i) * {lds}i + {kk}i)"
            out.append(f"    let a{i}_{kk} = subgroupMatrixLoad<{left}>(&mlcweb_as, {at}, false, {lds}u);")
        for j in range(tj):
            at = f"u32((wn + {j * sn}i) * {lds}i + {kk}i)"
            out.append(f"    let b{j}_{kk} = subgroupMatrixLoad<{right}>(&mlcweb_bs, {at}, true, {lds}u);")
        for i in range(ti):
            for j in range(tj):
                out.append(f"    c{i}_{j} = subgroupMatrixMultiplyAccumulate(a{i}_{kk}, b{j}_{kk}, c{i}_{j});")
    return out


def _emulated_mma(ti: int, tj: int, lds: int, config: MatrixConfig) -> list[str]:
    """Each subgroup's multiply-adds of the ``config.k``-deep step at ``kk`` by its lanes: element ``e`` of
    result matrix ``(i, j)`` (row-major, as ``subgroupMatrixStore`` lays it out) is lane ``e % subgroup_size``'s
    ``e / subgroup_size``-th, from the same workgroup-memory rows the subgroup-matrix loads read."""
    sm, sn, sk, lanes = config.m, config.n, config.k, config.subgroup_size
    out = []
    for i in range(ti):
        for j in range(tj):
            out += [
                f"    for (var t = 0u; t < {sm * sn // lanes}u; t++) {{",
                f"      let e = lane + t * {lanes}u; let r = i32(e / {sn}u); let c = i32(e % {sn}u);",
                f"      var sum = c{i}_{j}[t];",
                f"      for (var x = 0i; x < {sk}i; x++) {{",
                f"        sum += f32(mlcweb_as[(wm + {i * sm}i + r) * {lds}i + kk + x])"
                f" * f32(mlcweb_bs[(wn + {j * sn}i + c) * {lds}i + kk + x]);",
                "      }",
                f"      c{i}_{j}[t] = sum;",
                "    }",
            ]
    return out


def _emulated_store(i: int, j: int, slot: str, config: MatrixConfig) -> str:
    lanes, size = config.subgroup_size, config.m * config.n
    return (
        f"for (var t = 0u; t < {size // lanes}u; t++) {{"
        f" mlcweb_cs[{slot} * {size}u + lane + t * {lanes}u] = c{i}_{j}[t]; }}"
    )

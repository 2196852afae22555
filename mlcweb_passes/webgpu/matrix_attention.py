"""Float16 flash attention on WebGPU's subgroup matrices (tensor cores), beside the portable kernel.

:func:`~mlcweb_passes.webgpu.flash_attention.webgpu_flash_attention_kernel` multiplies on the scalar lanes;
in SD1.5's UNet on an H100 through Dawn its 4096-token self-attention became the largest kernel once the
GEMMs ran on subgroup matrices. Where the adapter offers ``chromium-experimental-subgroup-matrix`` with
float16 operands and float32 results, this module writes the same attention (FlashAttention-2's online
softmax, Dao 2023) on them, in WGSL, for each float16 kernel that function made (it records what it
computes in the PrimFunc attribute :data:`~mlcweb_passes.webgpu.flash_attention.ATTENTION_ATTR`):

- a workgroup of ``subgroups`` subgroups takes ``16 x subgroups`` query rows of one head; the Q tile goes
  through workgroup memory once (the head dimension zero-padded to a multiple of 16) into left-operand
  subgroup matrices that stay in registers for the whole walk over the keys. Q's tile then gives its
  workgroup memory to the K, V and probability tiles (one float16 array, :data:`UNION`; the float32
  scratch apart), and the rescale flag is declared before the arrays: through Dawn on NVIDIA's Vulkan
  driver every form with the flag declared after the arrays holding K and V computed wrong products,
  every form with it before them right (why is not known; numerics checked with
  ``benchmarks/webgpu/attention_check.mjs``; emulation on the lanes cannot show it);
- each step copies ``keys`` rows of K, and of V transposed, to workgroup memory (4-wide reads, zeros past
  the sequence; with :data:`PREFETCH` the next step's are read into registers before this step's
  products). V is transposed so that both right operands are read column-major, as the GEMMs read theirs.
  With :data:`DOUBLE_BUFFER` (long walks of narrow heads), two K/V tiles take turns and the next one is
  stored behind the barrier after this step's scores: three barriers a step instead of five;
- each subgroup computes its 16 rows' scores ``Q @ K^T`` into float32 result matrices and stores them to
  a per-subgroup scratch;
- the subgroup's lanes, two a row, take the scores of their row (interleaved columns), combine the row
  maximum with one ``subgroupShuffleXor`` and write the probabilities ``exp2(s * scale * log2(e) - m)``
  as float16 (as tensor-core kernels feed their second product) to workgroup memory. The running maximum
  ``m`` moves only when a row's scores pass it by more than :data:`TAU` (probabilities up to ``2**TAU``,
  exact once divided by the row's sum, which uses the same ``m``), as FlashAttention-4 does: result
  matrices cannot be scaled by rows, so rescaling the output means a round trip through workgroup memory,
  which then happens in the first steps only;
- ``P @ V`` accumulates into float32 result matrices that stay in registers;
- at the end the output goes through the scratch, 16 columns at a time, where each lane divides its row
  by the row's sum and stores its columns in the ``[B, N, H, D]`` layout.

The scratch holds a step's scores (or one 16-column output matrix), never the whole output, and steps are
16 keys: workgroup memory decided the speed more than any other change timed (first on kernels with these
instructions whose products were wrong; benchmarks/README.md), and 64 rows of 40- or 80-wide heads take
12-16 KiB with Q's tile shared (19-26 KiB apart).

:class:`PlanMatrixAttention` plans a kernel for every such PrimFunc (module attribute :data:`PLANS_ATTR`);
after compilation :func:`attention_kernels` writes each with the storage bindings TVM's own shader for it
declares (:func:`~mlcweb_passes.webgpu.matrix_gemm.bind_helpers`) and its grid, for the page to swap in
as it does the GEMM kernels.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

import tvm
from tvm import tirx

from ..gemm_analysis import UnsupportedGemmError
from . import lane_attention
from .flash_attention import ATTENTION_ATTR, WEBGPU_DEFAULT_SHARED
from .lane_attention import FORM as LANES_FORM
from .lane_attention import AttentionJSON, LanePlan, choose_lane_layout, lane_attention_source
from .matrix_gemm import PLANS_ATTR as GEMM_PLANS_ATTR
from .matrix_gemm import MatrixConfig, MatrixKernel, PlanMatrixKernels, bind_helpers, matrix_kernels, write_kernels

__all__ = [
    "PLANS_ATTR",
    "AttentionPlan",
    "PlanMatrixAttention",
    "attention_kernels",
    "plan_lane_attention",
    "plan_matrix_attention",
    "planned_kernels",
]

log = logging.getLogger(__name__)

PLANS_ATTR = "mlcweb.matrix_attention"  # module attribute: {PrimFunc name: AttentionPlan as JSON}
ROWS = 16  # query rows a subgroup: one result matrix tall
PAD = 8  # halves of padding a float16 workgroup-memory row (rows 16-byte aligned, spread over banks)
SCRATCH_PAD = 4  # floats of padding a scratch row
NEG = "-1e30f"  # a masked key's score: finite, so exp2(NEG - m) is 0 without inf - inf
TAU = 8.0  # how far (base 2) a row's scores may pass its running maximum before the output is rescaled
# (subgroups, keys a step), in order of preference: 64 rows share each K/V tile, in short steps (little
# workgroup memory and few registers a lane: more workgroups resident)
LAYOUTS: tuple[tuple[int, int], ...] = ((4, 16), (2, 16))
# heads at most NARROW_HEAD wide once padded (SD1.5's 40) try these first: their tiles are small enough
# that 128 query rows a workgroup (each K/V tile shared by twice the rows) still leave room for several
# workgroups (SD1.5's 64x64 self-attention on an H100: 1.08 -> 1.01 ms; SD2.1's heads of 64: 0.79 -> 0.83)
NARROW_HEAD = 48
NARROW_LAYOUTS: tuple[tuple[int, int], ...] = ((8, 16),)
PREFETCH = True  # the next step's K/V read into registers while this step's products run
# Q's tile in one float16 array with the K, V and probability tiles, which need it only once Q is in
# registers: less workgroup memory, more workgroups resident (heads of 40: 12 KiB instead of 19; one
# 64x64 self-attention 1.29 -> 1.08 ms on an H100). Not in emulation, which reads Q's tile every step.
UNION = True
# two K/V tiles taking turns (:func:`_walk`): a step's next tile is stored right after
# its scores, behind the barrier that already separates them from the softmax, and becomes visible at
# the flag's barriers, so a step has 3 workgroup barriers instead of 5 (workgroupUniformLoad is two).
# Only for the narrow heads' layouts (:data:`NARROW_LAYOUTS`) walking at least DOUBLE_MIN_STEPS steps:
# on an H100, SD1.5's 64x64 self-attention 5.38 -> 5.00 ms a UNet step, but its cross-attentions (5
# steps) 2-5% slower, 80-wide heads on 4 subgroups no faster and SD2.1's 64-wide ones 0.77 -> 1.04 ms
DOUBLE_BUFFER = True
DOUBLE_MIN_STEPS = 64


@dataclass(frozen=True)
class AttentionPlan(AttentionJSON):
    """One attention kernel: ``batch x heads`` products of ``q_len`` queries and ``kv_len`` keys of
    ``head_dim``; the layout (``subgroups`` of 16 rows, ``keys`` a step); the PrimFunc's parameter names
    (q, k, v, o) and the helper WGSL with ``{Pi}`` for their bindings."""

    batch: int
    q_len: int
    kv_len: int
    heads: int
    head_dim: int
    scale: float
    subgroups: int
    keys: int
    params: tuple[str, ...]
    helpers: str
    prefetch: bool = False  # the next step's K/V read into registers during this step
    union: bool = False  # Q's tile shares one array with the K, V and probability tiles (:data:`UNION`)
    buffers: int = 1  # K/V tiles taking turns (:data:`DOUBLE_BUFFER`: 2)

    @property
    def padded_dim(self) -> int:
        return _padded(self.head_dim)


def _padded(head_dim: int) -> int:
    """The head dimension zero-padded to whole 16-wide matrices."""
    return -(-head_dim // 16) * 16


def _plus(offset: str) -> str:
    """``offset + `` for a WGSL index expression (a tile's first element), or nothing for the first tile."""
    return f"{offset} + " if offset else ""


def _arrays(rows: int, keys: int, dp: int, union: bool = False, buffers: int = 1) -> dict[str, tuple[str, int]]:
    """A layout's workgroup arrays, each one operand (name: element type, elements): the Q, K and
    transposed V tiles (``buffers`` of each), the probabilities, the float32 scratch (a step's scores, or
    16 columns of the output); with ``union``, Q's tile and the K, V and probability tiles in one array,
    ``mlcweb_hs`` (:func:`_unite`)."""
    arrays = {
        "mlcweb_qs": ("f16", rows * (dp + PAD)),
        "mlcweb_ks": ("f16", buffers * keys * (dp + PAD)),
        "mlcweb_vs": ("f16", buffers * dp * (keys + PAD)),
        "mlcweb_ps": ("f16", rows * (keys + PAD)),
        "mlcweb_ss": ("f32", rows * (max(keys, 16) + SCRATCH_PAD)),
    }
    if not union:
        return arrays
    steps = sum(arrays[name][1] for name in ("mlcweb_ks", "mlcweb_vs", "mlcweb_ps"))
    return {"mlcweb_hs": ("f16", max(arrays["mlcweb_qs"][1], steps)), "mlcweb_ss": arrays["mlcweb_ss"]}


def _union_offsets(rows: int, keys: int, dp: int, buffers: int = 1) -> dict[str, int]:
    """Where each float16 tile starts in the union array: Q's and K's at 0, then V's, then P's."""
    arrays = _arrays(rows, keys, dp, buffers=buffers)
    k, v = arrays["mlcweb_ks"][1], arrays["mlcweb_vs"][1]
    return {"mlcweb_qs": 0, "mlcweb_ks": 0, "mlcweb_vs": k, "mlcweb_ps": k + v}


def _unite(body: str, offsets: dict[str, int]) -> str:
    """``body`` with each float16 tile's accesses moved into the union array at its offset."""
    for name, at in offsets.items():
        body = body.replace(f"&{name}, ", f"&mlcweb_hs, {at}u + ").replace(f"{name}[", f"mlcweb_hs[{at}i + ")
    return body


def _shared_bytes(subgroups: int, keys: int, dp: int, union: bool = False, buffers: int = 1) -> int:
    """Workgroup memory of a layout: its arrays (:func:`_arrays`) and the rescale flag."""
    arrays = _arrays(ROWS * subgroups, keys, dp, union, buffers).values()
    return sum(count * (2 if kind == "f16" else 4) for kind, count in arrays) + 16


def _buffers(about: dict[str, Any], subgroups: int, keys: int, max_shared: int) -> int:
    """K/V tiles of the planned layout: two (:data:`DOUBLE_BUFFER`) for a narrow head's layout walking at
    least :data:`DOUBLE_MIN_STEPS` steps where both fit ``max_shared``, else one."""
    dp = _padded(about["head_dim"])
    narrow = dp <= NARROW_HEAD and (subgroups, keys) in NARROW_LAYOUTS
    long = -(-about["kv_len"] // keys) >= DOUBLE_MIN_STEPS
    fits = _shared_bytes(subgroups, keys, dp, UNION, 2) <= max_shared
    return 2 if DOUBLE_BUFFER and narrow and long and fits else 1


def choose_layout(head_dim: int, max_shared: int, union: bool = False) -> tuple[int, int]:
    """``(subgroups, keys)``: the first of :data:`LAYOUTS` (after :data:`NARROW_LAYOUTS` for heads at most
    :data:`NARROW_HEAD` wide) that fits ``max_shared`` bytes of workgroup memory (with ``union``, Q's
    tile sharing an array); raises :class:`UnsupportedGemmError` where none fits."""
    dp = _padded(head_dim)
    for subgroups, keys in (*(NARROW_LAYOUTS if dp <= NARROW_HEAD else ()), *LAYOUTS):
        if _shared_bytes(subgroups, keys, dp, union) <= max_shared:
            return subgroups, keys
    raise UnsupportedGemmError(f"no layout for head dimension {head_dim} fits {max_shared} bytes")


def _attention(func: tirx.PrimFunc) -> tuple[dict[str, Any], tuple[str, ...]]:
    """What the flash-attention PrimFunc ``func`` computes (:data:`ATTENTION_ATTR`) and its parameter names;
    raises :class:`UnsupportedGemmError` where neither written kernel takes it: not float16, a head
    dimension not a multiple of 4 (their copies are 4-wide), parameters other than q, k, v, o."""
    about = json.loads(str(func.attrs[ATTENTION_ATTR]))
    if about["dtype"] != "float16":
        raise UnsupportedGemmError(f"{about['dtype']} attention")
    if about["head_dim"] % 4 or about["scale"] <= 0:
        raise UnsupportedGemmError(f"head dimension {about['head_dim']} (a multiple of 4) or scale {about['scale']}")
    params = tuple(str(p.name) for p in func.params)
    if len(params) != 4:
        raise UnsupportedGemmError(f"{len(params)} parameters, not q, k, v, o")
    return about, params


def plan_matrix_attention(
    func: tirx.PrimFunc, config: MatrixConfig, max_shared: int = WEBGPU_DEFAULT_SHARED
) -> AttentionPlan:
    """The subgroup-matrix kernel for the flash-attention PrimFunc ``func``; raises
    :class:`UnsupportedGemmError` where there is none: not float16, a head dimension not a multiple of 4
    (the copies are 4-wide), a configuration other than 16x16x16 on 32-wide subgroups, no layout that fits."""
    about, params = _attention(func)
    if (config.m, config.n, config.k, config.subgroup_size) != (16, 16, 16, 32):
        raise UnsupportedGemmError(f"configuration {config}: the kernel is written for 16x16x16 on 32 lanes")
    subgroups, keys = choose_layout(about["head_dim"], max_shared, UNION)
    buffers = _buffers(about, subgroups, keys, max_shared)
    plan = AttentionPlan(
        about["batch"], about["q_len"], about["kv_len"], about["heads"], about["head_dim"], about["scale"],
        subgroups, keys, params, "", PREFETCH, UNION, buffers,
    )  # fmt: skip
    return AttentionPlan(**{**asdict(plan), "helpers": _helpers(plan, about["views"])})


def plan_lane_attention(func: tirx.PrimFunc, max_shared: int = WEBGPU_DEFAULT_SHARED) -> LanePlan:
    """The kernel on the lanes (:mod:`~mlcweb_passes.webgpu.lane_attention`) for the flash-attention
    PrimFunc ``func``; raises :class:`UnsupportedGemmError` where there is none: not float16, a head
    dimension not a multiple of 4 (the copies are 4-wide), no layout that fits ``max_shared``."""
    about, params = _attention(func)
    rows, keys = choose_lane_layout(about["head_dim"], max_shared)
    plan = LanePlan(
        about["batch"], about["q_len"], about["kv_len"], about["heads"], about["head_dim"], about["scale"],
        rows, keys, params, "", prefetch=lane_attention.PREFETCH,
    )  # fmt: skip
    return LanePlan(**{**asdict(plan), "helpers": _helpers(plan, about["views"])})


def _helpers(plan: AttentionPlan | LanePlan, views: list[list[int] | None]) -> str:
    """``mlcweb_q4/k4/v4(b, n, h, c)``: 4 elements of row ``n``, head ``h`` from column ``c`` on;
    ``mlcweb_o(b, n, h, c, v)``: store one output element."""
    lines = []
    d, heads = plan.head_dim, plan.heads
    for i, (name, n) in enumerate((("q", plan.q_len), ("k", plan.kv_len), ("v", plan.kv_len))):
        view = views[i]
        row = f"(bb * {n}i + n) * {view[0]}i + {view[1]}i" if view else f"bb * {n}i + n"
        offset = f"({row}) * {heads * d}i + hh * {d}i + c"
        lines.append(
            f"fn mlcweb_{name}4(bb : i32, n : i32, hh : i32, c : i32) -> vec4<f16> "
            f"{{ return mlcweb_get4_{{P{i}}}(({offset}) / 4i); }}"
        )
    lines.append(
        "fn mlcweb_o(bb : i32, n : i32, hh : i32, c : i32, v : f32) "
        f"{{ mlcweb_set_{{P3}}(((bb * {plan.q_len}i + n) * {heads}i + hh) * {d}i + c, f16(v)); }}"
    )
    return "\n".join(lines)


@tvm.transform.module_pass(opt_level=0, name="mlcweb.PlanMatrixAttention")
class PlanMatrixAttention(PlanMatrixKernels):
    """Plan a subgroup-matrix kernel for every float16 flash-attention PrimFunc (WebGPU only; the module is
    otherwise unchanged): the plans go to the module attribute :data:`PLANS_ATTR`, for
    :func:`attention_kernels` after compilation. See the module docstring. With ``lanes``, the kernels
    are :mod:`~mlcweb_passes.webgpu.lane_attention`'s instead (multiply-adds on the lanes, installed the
    same way, beside the subgroup-matrix GEMMs)."""

    attr = PLANS_ATTR
    what = "attention kernels"

    def __init__(self, config: MatrixConfig, max_shared: int | None = None, lanes: bool = False) -> None:
        super().__init__(config, max_shared)
        self.lanes = lanes

    def wants(self, func: tirx.PrimFunc) -> bool:
        return func.attrs is not None and ATTENTION_ATTR in func.attrs

    def plan(self, func: tirx.PrimFunc, max_shared: int, target: tvm.target.Target) -> str:
        if self.lanes:
            return plan_lane_attention(func, max_shared).to_json()
        return plan_matrix_attention(func, self.config, max_shared).to_json()


def attention_kernels(
    plans: dict[str, str], sources: dict[str, str], config: MatrixConfig, emulate: bool = False
) -> dict[str, MatrixKernel]:
    """Each planned attention's kernel, by the name of the TVM shader it replaces (``<function>_kernel``),
    as :func:`~mlcweb_passes.webgpu.matrix_gemm.matrix_kernels` writes the GEMMs' (``emulate`` likewise:
    the matrix operations done by the lanes, with a Q tile of their own in workgroup memory, which must
    fit beside the plan's). ``config`` is the one the plans were made for."""

    def write(shader: str, text: str, source: str) -> MatrixKernel:
        if json.loads(text).get("form") == LANES_FORM:
            lanes = LanePlan.from_json(text)
            declarations, helpers = bind_helpers(lanes.params, lanes.helpers, source)
            return MatrixKernel(shader, lane_attention_source(shader, lanes, declarations, helpers), lanes.grid)
        plan = AttentionPlan.from_json(text)
        declarations, helpers = bind_helpers(plan.params, plan.helpers, source)
        grid = (-(-plan.q_len // (ROWS * plan.subgroups)), plan.batch * plan.heads, 1)
        return MatrixKernel(shader, _source(shader, plan, declarations, helpers, emulate), grid)

    return write_kernels(plans, sources, write)


def planned_kernels(
    lowered: tvm.IRModule, sources: dict[str, str], config: MatrixConfig, gemm_attr: str = GEMM_PLANS_ATTR
) -> tuple[dict[str, MatrixKernel], dict[str, MatrixKernel]]:
    """The GEMM and the attention kernels on subgroup matrices planned in ``lowered`` (module attributes
    ``gemm_attr``, by default :data:`~mlcweb_passes.webgpu.matrix_gemm.PLANS_ATTR`, and
    :data:`PLANS_ATTR`), written for TVM's compiled ``sources``
    (:func:`~mlcweb_passes.webgpu.matrix_gemm.matrix_kernels`, :func:`attention_kernels`)."""
    attrs = lowered.attrs if lowered.attrs is not None else {}

    def plans(key: str) -> dict[str, str]:
        return {str(k): str(v) for k, v in attrs.get(key, {}).items()}

    return matrix_kernels(plans(gemm_attr), sources, config), attention_kernels(plans(PLANS_ATTR), sources, config)


@dataclass(frozen=True)
class _Sizes:
    """A planned kernel's sizes in WGSL terms: workgroup-memory row strides (``ld`` for the Q and K tiles,
    ``vld`` for V's transposed tile, ``pld`` for the probabilities, ``width`` for the float32 scratch, in
    elements) and extents."""

    plan: AttentionPlan
    emulate: bool

    @property
    def rows(self) -> int:  # query rows a workgroup
        return ROWS * self.plan.subgroups

    @property
    def threads(self) -> int:
        return 32 * self.plan.subgroups

    @property
    def ld(self) -> int:
        return self.plan.padded_dim + PAD

    @property
    def vld(self) -> int:
        return self.plan.keys + PAD

    @property
    def pld(self) -> int:
        return self.plan.keys + PAD

    @property
    def width(self) -> int:  # a step's scores, or 16 columns of the output
        return max(self.plan.keys, 16) + SCRATCH_PAD

    @property
    def k_tile(self) -> int:  # elements of one K tile (the next one starts there)
        return self.plan.keys * self.ld

    @property
    def v_tile(self) -> int:  # elements of one transposed V tile
        return self.plan.padded_dim * self.vld

    @property
    def pieces(self) -> int:  # 4-element pieces of a K (or V) tile
        return self.plan.keys * self.plan.padded_dim // 4

    @property
    def reads(self) -> int:  # 4-element reads of K (and of V) a thread a step
        return -(-self.pieces // self.threads)


LEFT, RIGHT = "subgroup_matrix_left<f16, 16, 16>", "subgroup_matrix_right<f16, 16, 16>"
RESULT = "subgroup_matrix_result<f32, 16, 16>"


def _source(shader: str, plan: AttentionPlan, declarations: str, helpers: str, emulate: bool) -> str:
    z = _Sizes(plan, emulate)
    mats = plan.padded_dim // 16
    body = _copy_q(z)
    body.append("  workgroupBarrier();")
    if emulate:
        body += [f"  var o{j} : array<f32, 8>;" for j in range(mats)]
    else:  # Q's left operands, kept in registers for the whole walk over the keys; the output's results
        for c in range(mats):
            at = f"u32(sg16 * {z.ld}i + {16 * c}i)"
            body.append(f"  let qm{c} = subgroupMatrixLoad<{LEFT}>(&mlcweb_qs, {at}, false, {z.ld}u);")
        body += [f"  var o{j} = {RESULT}();" for j in range(mats)]
    body += [f"  var xk{i} : vec4<f16>; var xv{i} : vec4<f16>;" for i in range(z.reads)]
    body += _walk(z)
    return _wrap(shader, z, declarations, helpers, body)


def _walk(z: _Sizes) -> list[str]:
    """The walk over the keys, from after Q's left operands are loaded, and the output's store.

    With one K/V tile, a step stores its tile between two barriers (the last step's products are done
    with the tile; the stores are visible to the scores), then a barrier before the softmax reads the
    scores and the two of ``workgroupUniformLoad``: five. With two (:data:`DOUBLE_BUFFER`), step ``kt``
    reads tile ``kt % 2`` and stores the next into the other right after the barrier that ends its scores
    (every read of that tile, by step ``kt - 1``'s products, was before it), visible to step ``kt + 1``
    after the flag's barriers: three; a rescale then ends with a barrier of its own (the next step's
    scores overwrite the scratch it read last)."""
    p, step = z.plan, f"{z.plan.keys}i"
    if p.buffers == 2:
        prologue = [
            *_read_kv(z, "0i"),
            "  workgroupBarrier();",  # every subgroup has Q's operands before tile 0 overwrites a shared array
            *_store_kv(z, "0i", "0i"),
            *(_read_kv(z, step) if p.prefetch else []),
            "  workgroupBarrier();",
        ]
        tile = [f"  let kb = (kt & 1i) * {z.k_tile}i; let vb = (kt & 1i) * {z.v_tile}i;"]
        if p.prefetch:  # registers hold tile kt + 1, read during step kt - 1
            refill = [*_store_kv(z, "nkb", "nvb"), *_read_kv(z, f"(kt + 2i) * {step}")]
        else:
            refill = [*_read_kv(z, f"(kt + 1i) * {step}"), *_store_kv(z, "nkb", "nvb")]
        after_scores = [f"  let nkb = {z.k_tile}i - kb; let nvb = {z.v_tile}i - vb;", *refill]
        kb, vb, rescaled = "kb", "vb", ["  workgroupBarrier();"]
    else:
        prologue = _read_kv(z, "0i") if p.prefetch else []
        tile = [
            *([] if p.prefetch else _read_kv(z, f"kt * {step}")),
            *_store_kv(z),
            *(_read_kv(z, f"(kt + 1i) * {step}") if p.prefetch else []),
            "  workgroupBarrier();",
        ]
        after_scores, kb, vb, rescaled = [], "", "", []
    return [
        *prologue,
        f"  var m = {NEG};",
        "  var l = 0.0f;",
        f"  for (var kt = 0i; kt < {-(-p.kv_len // p.keys)}i; kt++) {{",
        *([] if p.buffers == 2 else ["  workgroupBarrier();"]),
        "  if (li == 0u) { mlcweb_flag = 0u; }",
        *tile,
        *_scores(z, kb),
        "  workgroupBarrier();",
        *after_scores,
        *_softmax(z),
        "  let rescale = workgroupUniformLoad(&mlcweb_flag);",
        "  if (rescale == 1u && kt > 0i) {",
        *_rescale(z),
        *rescaled,
        "  }",
        *_output_products(z, vb),
        "  }",
        *_store_output(z),
    ]  # fmt: skip


def _copy_q(z: _Sizes) -> list[str]:
    """The workgroup's Q rows into their workgroup array, 4 elements a thread at a time; zeros past the
    sequence and the head dimension."""
    quads, dst = z.plan.padded_dim // 4, "mlcweb_qs"
    return [
        f"  for (var e = i32(li); e < {z.rows * quads}i; e += {z.threads}i) {{",
        f"    let row = e / {quads}i; let c = 4i * (e % {quads}i); let n = q0 + row;",
        "    var x = vec4<f16>();",
        f"    if (n < {z.plan.q_len}i && c < {z.plan.head_dim}i) {{ x = mlcweb_q4(bb, n, hh, c); }}",
        f"    let o = row * {z.ld}i + c;",
        f"    {dst}[o] = x.x; {dst}[o + 1i] = x.y; {dst}[o + 2i] = x.z; {dst}[o + 3i] = x.w;",
        "  }",
    ]


def _kv_element(z: _Sizes, i: int) -> str:
    """The thread's ``i``-th 4-element piece of a K/V tile: its index ``e<i>``, row and first column."""
    quads = z.plan.padded_dim // 4
    return f"let e{i} = i32(li) + {i * z.threads}i; let row{i} = e{i} / {quads}i; let c{i} = 4i * (e{i} % {quads}i);"


def _read_kv(z: _Sizes, first: str) -> list[str]:
    """The thread's pieces of the K and V rows from ``first`` on into registers ``xk<i>``, ``xv<i>``,
    every read issued before any is stored; zeros past the sequence and the head dimension."""
    p, out = z.plan, []
    total = z.pieces
    for i in range(z.reads):
        inside = f"e{i} < {total}i && " if total % z.threads else ""
        out += [
            f"  {{ {_kv_element(z, i)} let n = {first} + row{i};",
            f"    xk{i} = vec4<f16>(); xv{i} = vec4<f16>();",
            f"    if ({inside}n < {p.kv_len}i && c{i} < {p.head_dim}i) {{",
            f"      xk{i} = mlcweb_k4(bb, n, hh, c{i}); xv{i} = mlcweb_v4(bb, n, hh, c{i}); }} }}",
        ]
    return out


def _store_kv(z: _Sizes, kb: str = "", vb: str = "") -> list[str]:
    """The registers ``xk<i>``, ``xv<i>`` into the K tile and V's transposed tile (those starting at
    elements ``kb`` and ``vb``, WGSL expressions; empty: the first): ``P @ V`` reads V as a column-major
    right operand, as the GEMMs read theirs."""
    total, out = z.pieces, []
    kb, vb = _plus(kb), _plus(vb)
    for i in range(z.reads):
        inside = f"if (e{i} < {total}i) " if total % z.threads else ""
        k = f"{kb}row{i} * {z.ld}i + c{i} + "
        stores = " ".join(
            [f"mlcweb_ks[{k}{x}i] = xk{i}.{comp};" for x, comp in enumerate("xyzw")]
            + [f"mlcweb_vs[{vb}(c{i} + {x}i) * {z.vld}i + row{i}] = xv{i}.{comp};" for x, comp in enumerate("xyzw")]
        )
        out.append(f"  {{ {_kv_element(z, i)} {inside}{{ {stores} }} }}")
    return out


def _scores(z: _Sizes, kb: str = "") -> list[str]:
    """The subgroup's 16 rows of ``Q @ K^T`` for this step's keys (the K tile at element ``kb``), into
    its scratch."""
    dp, bc, ld = z.plan.padded_dim, z.plan.keys, z.ld
    if z.emulate:
        return _emulated_scores(z, kb)
    out, kb = [], _plus(kb)
    for j in range(bc // 16):
        out.append(f"  var s{j} = {RESULT}();")
        for c in range(dp // 16):
            at = f"u32({kb}{16 * j}i * {ld}i + {16 * c}i)"
            out.append(
                f"  s{j} = subgroupMatrixMultiplyAccumulate(qm{c}, "
                f"subgroupMatrixLoad<{RIGHT}>(&mlcweb_ks, {at}, true, {ld}u), s{j});"
            )
        out.append(f"  subgroupMatrixStore(&mlcweb_ss, u32(sbase + {16 * j}i), s{j}, false, {z.width}u);")
    return out


def _softmax(z: _Sizes) -> list[str]:
    """The online softmax of the lanes' row (two lanes a row, interleaved columns): the running maximum
    moved only past :data:`TAU` (then the flag asks for the output to be rescaled by ``alpha``), the
    probabilities to workgroup memory as float16, the row's partial sum."""
    bc, width, pld = z.plan.keys, z.width, z.pld
    scale2 = float(z.plan.scale) * 1.4426950408889634
    out = [f"  var sv : array<f32, {bc // 2}>;", f"  var mx = {NEG};"]
    whole = z.plan.kv_len % bc == 0  # no key past the sequence in any step: nothing to mask
    for t in range(bc // 2):
        col = f"{2 * t}i + h"
        score = f"mlcweb_ss[sbase + r * {width}i + {col}]"
        if not whole:
            score = f"select({NEG}, {score}, kt * {bc}i + {col} < {z.plan.kv_len}i)"
        out += [
            f"  sv[{t}] = {score};",
            f"  mx = max(mx, sv[{t}]);",
        ]
    out += [
        "  mx = max(mx, subgroupShuffleXor(mx, 1u));",
        "  var mnew = m;",
        f"  if (mx * {scale2!r}f > m + {TAU!r}f) {{ mnew = mx * {scale2!r}f; mlcweb_flag = 1u; }}",
        "  let alpha = exp2(m - mnew);",
        "  m = mnew;",
        "  var sum = 0.0f;",
    ]
    for t in range(bc // 2):
        out += [
            f"  {{ let p = exp2(sv[{t}] * {scale2!r}f - m); sum += p;",
            f"    mlcweb_ps[pbase + r * {pld}i + {2 * t}i + h] = f16(p); }}",
        ]
    return [*out, "  l = l * alpha + sum;"]


def _output_to_scratch(z: _Sizes, j: int) -> list[str]:
    """Columns ``16 j`` to ``16 j + 15`` of the output (result matrix ``j``) into the subgroup's
    scratch, where each lane's row starts at ``sbase + r * width``."""
    width = z.width
    if z.emulate:
        store = _emulated_elements(f"mlcweb_ss[sbase + rr * {width}i + cc] = o{j}[t];")
    else:
        store = f"  subgroupMatrixStore(&mlcweb_ss, u32(sbase), o{j}, false, {width}u);"
    return ["  workgroupBarrier();", store, "  workgroupBarrier();"]


def _rescale(z: _Sizes) -> list[str]:
    """The output's rows multiplied by their ``alpha``, 16 columns at a time through the scratch (the
    scratch holds a step's scores, not the whole output: less workgroup memory, more workgroups resident)."""
    width, out = z.width, []
    for j in range(z.plan.padded_dim // 16):
        out += _output_to_scratch(z, j)
        out += [f"  mlcweb_ss[sbase + r * {width}i + {c}i + h] *= alpha;" for c in range(0, 16, 2)]
        out.append("  workgroupBarrier();")
        if z.emulate:
            out.append(_emulated_elements(f"o{j}[t] = mlcweb_ss[sbase + rr * {width}i + cc];"))
        else:
            out.append(f"  o{j} = subgroupMatrixLoad<{RESULT}>(&mlcweb_ss, u32(sbase), false, {width}u);")
    return out


def _output_products(z: _Sizes, vb: str = "") -> list[str]:
    """``P @ V`` for this step (the V tile at element ``vb``) added to the output's result matrices."""
    bc, pld = z.plan.keys, z.pld
    out, vbase = [], _plus(vb)
    if z.emulate:
        for j in range(z.plan.padded_dim // 16):
            body = (
                f"var acc = 0.0f; for (var x = 0i; x < {bc}i; x++) {{ acc += f32(mlcweb_ps[pbase + rr * {pld}i + x])"
                f" * f32(mlcweb_vs[{vbase}({16 * j}i + cc) * {z.vld}i + x]); }} o{j}[t] += acc;"
            )
            out.append(_emulated_elements(body))
        return out
    for kc in range(bc // 16):
        out.append(f"  let pa{kc} = subgroupMatrixLoad<{LEFT}>(&mlcweb_ps, u32(pbase + {16 * kc}i), false, {pld}u);")
    for j in range(z.plan.padded_dim // 16):
        for kc in range(bc // 16):
            at = f"u32({vbase}{16 * j * z.vld + 16 * kc}i)"
            vb = f"subgroupMatrixLoad<{RIGHT}>(&mlcweb_vs, {at}, true, {z.vld}u)"
            out.append(f"  o{j} = subgroupMatrixMultiplyAccumulate(pa{kc}, {vb}, o{j});")
    return out


def _emulated_elements(statement: str) -> str:
    """``statement`` for each of the lane's 8 elements ``t`` of a 16x16 result (row ``rr``, column
    ``cc``; element ``lane + 32 t`` in row-major order), as the emulated result matrices hold them."""
    return (
        "  for (var t = 0i; t < 8i; t++) { let e = i32(lane) + 32i * t; let rr = e / 16i; let cc = e % 16i; "
        f"{statement} }}"
    )


def _store_output(z: _Sizes) -> list[str]:
    """The output through the scratch, 16 columns at a time: each lane's columns of its row divided by
    the row's sum (the pair's partial sums added)."""
    d, width = z.plan.head_dim, z.width
    out = ["  l += subgroupShuffleXor(l, 1u);", "  let n = q0 + sg16 + r;"]
    for j in range(z.plan.padded_dim // 16):
        out += [*_output_to_scratch(z, j), f"  if (n < {z.plan.q_len}i) {{"]
        for c in range(0, min(16, d - 16 * j), 2):  # column 16 j + c + h: h is 0 or 1, d a multiple of 4
            out.append(f"    mlcweb_o(bb, n, hh, {16 * j + c}i + h, mlcweb_ss[sbase + r * {width}i + {c}i + h] / l);")
        out.append("  }")
    return out


def _wrap(shader: str, z: _Sizes, declarations: str, helpers: str, body: list[str]) -> str:
    plan = z.plan
    extensions = "enable f16;\nenable subgroups;"
    if z.emulate:
        builtins = "@builtin(local_invocation_index) li : u32"
        lanes = "  let sg = li / 32u;\n  let lane = li % 32u;\n"
    else:
        extensions += (
            "\nenable chromium_experimental_subgroup_matrix;\n"
            "diagnostic(off, chromium_experimental.subgroup_matrix_uniformity);"
        )
        builtins = (
            "@builtin(local_invocation_index) li : u32,\n"
            "        @builtin(subgroup_id) sg : u32, @builtin(subgroup_invocation_id) lane : u32"
        )
        lanes = ""
    nl, mode = "\n", " (emulated)" if z.emulate else ""
    extras = ", K/V read a step ahead" if plan.prefetch else ""
    if plan.buffers == 2:
        extras += ", two K/V tiles taking turns"
    union = plan.union and not z.emulate  # emulation reads Q's tile every step
    if union:
        extras += ", Q's tile sharing one array with K, V and P"
        body = _unite(nl.join(body), _union_offsets(z.rows, plan.keys, plan.padded_dim, plan.buffers)).split(nl)
    arrays = "\n".join(
        f"var<workgroup> {name} : array<{kind}, {count}>;"
        for name, (kind, count) in _arrays(z.rows, plan.keys, plan.padded_dim, union, plan.buffers).items()
    )
    return f"""{extensions}
// mlcweb: flash attention, {plan.batch} x {plan.heads} heads of {plan.q_len} x {plan.kv_len} keys x {plan.head_dim},
// {plan.subgroups} subgroups of 16 rows, {plan.keys} keys a step{extras}, 16x16x16 subgroup matrices{mode}
{declarations}
var<workgroup> mlcweb_flag : u32;
{arrays}
{helpers}
@compute @workgroup_size({z.threads}, 1, 1)
fn {shader}(@builtin(workgroup_id) wg : vec3<u32>, {builtins}) {{
{lanes}  let bb = i32(wg.y) / {plan.heads}i;
  let hh = i32(wg.y) % {plan.heads}i;
  let q0 = i32(wg.x) * {z.rows}i;
  let sg16 = i32(sg) * 16i;
  let r = i32(lane / 2u);
  let h = i32(lane % 2u);
  let sbase = sg16 * {z.width}i;
  let pbase = sg16 * {z.pld}i;
{nl.join(body)}
}}
"""


def _emulated_scores(z: _Sizes, kb: str = "") -> list[str]:
    """The subgroup's 16 rows of ``Q @ K^T`` into its scratch, by its lanes, from the same workgroup
    memory the subgroup-matrix kernel reads (Q from its own tile, K from the tile at element ``kb``)."""
    bc, ld, kb = z.plan.keys, z.ld, _plus(kb)
    return [
        f"  for (var e = i32(lane); e < {16 * bc}i; e += 32i) {{",
        f"    let rr = e / {bc}i; let cc = e % {bc}i;",
        "    var sum = 0.0f;",
        f"    for (var x = 0i; x < {z.plan.padded_dim}i; x++) {{",
        f"      sum += f32(mlcweb_qs[(sg16 + rr) * {ld}i + x]) * f32(mlcweb_ks[{kb}cc * {ld}i + x]);",
        "    }",
        f"    mlcweb_ss[sbase + rr * {z.width}i + cc] = sum;",
        "  }",
    ]

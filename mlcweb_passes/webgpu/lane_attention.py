"""Float16 flash attention on the lanes in hand-written WGSL: 4-wide workgroup-memory reads, float32 tiles,
row reductions by subgroup shuffles.

The portable kernel (:func:`~mlcweb_passes.webgpu.flash_attention.webgpu_flash_attention_kernel`) is TIR,
and TVM's WebGPU code generator reads its workgroup memory one float16 element at a time and converts each
to float32 before its multiply-add: two workgroup-memory reads and two conversions for every two
multiply-adds of ``Q @ K^T``. Where the page already swaps in kernels of its own (an adapter with
subgroups and subgroup matrices, :mod:`~mlcweb_passes.webgpu.matrix_gemm`), this module writes the same
attention (FlashAttention-2's online softmax, Dao 2023) as WGSL that reads workgroup memory as it wants:

- a workgroup of ``rows / 4 x 8`` threads takes ``rows`` query rows of one head: thread ``(y, x)`` owns
  rows ``y + rows / 4 * i`` (``i < 4``), the keys ``x + 8 j`` of each step and the output columns
  ``x + 8 j``; the eight threads of a row are eight neighbouring lanes of one subgroup;
- the Q tile is converted to float32 once, and each step's K and V tiles as they are copied (4 elements
  a copy, zeros past the sequence and the head), rows of Q and K padded so that the eight rows a subgroup
  reads at once fall in distinct banks;
- scores: 4-wide float32 dot products, each Q read serving the thread's keys and each K read its rows;
- the row maximum and, at the end, the row sum are combined across the row's eight lanes with
  ``subgroupShuffleXor`` (no workgroup memory, no barrier); the running maximum is kept in base 2 over
  raw scores, a probability is ``exp2(s * scale * log2(e) - m)``;
- the probabilities go to workgroup memory as float32, the four rows of a thread in one 4-wide word per
  key, so ``P @ V`` reads one word and the thread's ``head_dim / 8`` values of V per key.

:func:`plan_lane_attention` plans a kernel for a flash-attention PrimFunc (module attribute
:data:`~mlcweb_passes.webgpu.matrix_attention.PLANS_ATTR`, as
:class:`~mlcweb_passes.webgpu.matrix_attention.PlanMatrixAttention` does with ``lanes=True``);
:func:`lane_attention_source` writes it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Self

from ..gemm_analysis import UnsupportedGemmError

__all__ = [
    "FORM",
    "LAYOUTS",
    "AttentionJSON",
    "LanePlan",
    "choose_lane_layout",
    "lane_attention_source",
    "shared_bytes",
]

FORM = "lanes"  # the plan's "form": what tells its JSON from a subgroup-matrix attention's
ROWS_PER_THREAD = 4
LANES = 8  # threads sharing a query row: neighbouring lanes of one subgroup
NEG = "-1e30f"  # a masked key's score: finite, so exp2(NEG - m) is 0 without inf - inf
# (rows, keys a step), in order of preference: more rows share each K/V tile copied
LAYOUTS = ((64, 32), (32, 32), (32, 16), (16, 16), (16, 8))
# each step's K and V tiles read from storage into registers during the step before (their latency hidden
# behind its arithmetic), instead of at the step's start
PREFETCH = False
STORE_V = "mlcweb_vs[vo] = vx.x; mlcweb_vs[vo + 1i] = vx.y; mlcweb_vs[vo + 2i] = vx.z; mlcweb_vs[vo + 3i] = vx.w;"


def _padded(head_dim: int) -> int:
    return -(-head_dim // LANES) * LANES


def shared_bytes(rows: int, keys: int, head_dim: int) -> int:
    """Workgroup memory of a layout: float32 Q and K tiles (rows padded by 4 elements), V tile, and the
    probabilities (4-wide words, one per row group and key, padded by one word a key)."""
    dp = _padded(head_dim)
    return 4 * ((rows + keys) * (dp + 4) + keys * dp + keys * (rows // ROWS_PER_THREAD + 1) * 4)


def choose_lane_layout(head_dim: int, max_shared: int, max_threads: int = 256) -> tuple[int, int]:
    """``(rows, keys)``: the first of :data:`LAYOUTS` that fits ``max_shared`` bytes and ``max_threads``;
    raises :class:`UnsupportedGemmError` where none does."""
    for rows, keys in LAYOUTS:
        threads = rows // ROWS_PER_THREAD * LANES
        if shared_bytes(rows, keys, head_dim) <= max_shared and threads <= max_threads:
            return rows, keys
    raise UnsupportedGemmError(f"no lane-attention layout for head dimension {head_dim} fits {max_shared} bytes")


class AttentionJSON:
    """JSON for an attention plan dataclass (module attribute values): its fields, ``params`` a tuple."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, text: str) -> Self:
        data = json.loads(text)
        data["params"] = tuple(data["params"])
        return cls(**data)


@dataclass(frozen=True)
class LanePlan(AttentionJSON):
    """One attention kernel on the lanes: ``batch x heads`` products of ``q_len`` queries and ``kv_len``
    keys of ``head_dim``; ``rows`` query rows a workgroup, ``keys`` a step; the PrimFunc's parameter names
    (q, k, v, o) and the helper WGSL (:func:`~mlcweb_passes.webgpu.matrix_attention.attention_helpers`)."""

    batch: int
    q_len: int
    kv_len: int
    heads: int
    head_dim: int
    scale: float
    rows: int
    keys: int
    params: tuple[str, ...]
    helpers: str
    form: str = FORM
    prefetch: bool = False

    @property
    def threads(self) -> int:
        return self.rows // ROWS_PER_THREAD * LANES

    @property
    def steps(self) -> int:  # key tiles walked
        return -(-self.kv_len // self.keys)

    @property
    def grid(self) -> tuple[int, int, int]:
        return -(-self.q_len // self.rows), self.batch * self.heads, 1


def _store_tiles(k: str, v: str, sq: int, dp: int) -> list[str]:
    """Row ``row``'s 4 elements from column ``4 * c4`` of K (``k``, float32) and V (``v``, a float32
    ``vx``) into their workgroup-memory tiles."""
    return [f"mlcweb_ks[row * {sq}i + c4] = {k};", f"let vx = {v}; let vo = row * {dp}i + 4i * c4;", STORE_V]


def _copy(p: LanePlan, d4: int, sq: int, dp: int) -> tuple[list[str], list[str], list[str]]:
    """Lines before the walk over the keys, at each step's start (between barriers), after its tiles
    are in workgroup memory: here, each step copies its own K and V tiles, 4 elements a copy."""
    step = [
        f"    for (var e = i32(li); e < {p.keys * d4}i; e += {p.threads}i) {{",
        f"      let row = e / {d4}i; let c4 = e % {d4}i; let n = kt * {p.keys}i + row;",
        "      var kx = vec4<f32>(); var vv = vec4<f32>();",
        f"      if (n < {p.kv_len}i && 4i * c4 < {p.head_dim}i) {{",
        "        kx = vec4<f32>(mlcweb_k4(bb, n, hh, 4i * c4)); vv = vec4<f32>(mlcweb_v4(bb, n, hh, 4i * c4));",
        "      }",
        *("      " + line for line in _store_tiles("kx", "vv", sq, dp)),
        "    }",
    ]
    return [], step, []


def _prefetched_copy(p: LanePlan, d4: int, sq: int, dp: int) -> tuple[list[str], list[str], list[str]]:
    """As :func:`_copy`, but each thread's share of a step's K and V tiles is read into registers during
    the step before (the first step's before the walk) and only stored at the step's start."""
    turns = -(-p.keys * d4 // p.threads)

    def fetch(step: str, indent: str) -> list[str]:
        out = []
        for t in range(turns):
            out += [
                f"{indent}{{ let e = i32(li) + {t * p.threads}i; let n = {step} * {p.keys}i + e / {d4}i;",
                f"{indent}  let c = 4i * (e % {d4}i); kr{t} = vec4<f16>(); vr{t} = vec4<f16>();",
                f"{indent}  if (e < {p.keys * d4}i && n < {p.kv_len}i && c < {p.head_dim}i) {{",
                f"{indent}    kr{t} = mlcweb_k4(bb, n, hh, c); vr{t} = mlcweb_v4(bb, n, hh, c);",
                f"{indent}  }}",
                f"{indent}}}",
            ]
        return out

    before = [f"  var kr{t} = vec4<f16>(); var vr{t} = vec4<f16>();" for t in range(turns)] + fetch("0i", "  ")
    store = []
    for t in range(turns):
        store += [
            f"    {{ let e = i32(li) + {t * p.threads}i;",
            f"      if (e < {p.keys * d4}i) {{",
            f"        let row = e / {d4}i; let c4 = e % {d4}i;",
            *("        " + line for line in _store_tiles(f"vec4<f32>(kr{t})", f"vec4<f32>(vr{t})", sq, dp)),
            "      }",
            "    }",
        ]
    after = [f"    if (kt + 1i < {p.steps}i) {{", *fetch("(kt + 1i)", "      "), "    }"]
    return before, store, after


def lane_attention_source(shader: str, plan: LanePlan, declarations: str, helpers: str) -> str:
    """The WGSL of ``plan``'s kernel, named ``shader``, with TVM's storage ``declarations`` and the bound
    ``helpers`` (:func:`~mlcweb_passes.webgpu.matrix_gemm.bind_helpers`)."""
    p = plan
    d, dp = p.head_dim, _padded(p.head_dim)
    d4, sq = dp // 4, dp // 4 + 1  # 4-wide words of a Q/K row, and its stride (one word of padding)
    rg, c, co = p.rows // ROWS_PER_THREAD, p.keys // LANES, dp // LANES
    pst = rg + 1  # words of probabilities a key (padded)
    scale2 = float(p.scale) * 1.4426950408889634
    rows = [f"ty + {rg * i}i" for i in range(ROWS_PER_THREAD)]
    copy = _prefetched_copy(p, d4, sq, dp) if p.prefetch else _copy(p, d4, sq, dp)
    body = [
        f"  for (var e = i32(li); e < {p.rows * d4}i; e += {p.threads}i) {{",
        f"    let row = e / {d4}i; let c4 = e % {d4}i; let n = q0 + row;",
        "    var x = vec4<f32>();",
        f"    if (n < {p.q_len}i && 4i * c4 < {d}i) {{ x = vec4<f32>(mlcweb_q4(bb, n, hh, 4i * c4)); }}",
        f"    mlcweb_qs[row * {sq}i + c4] = x;",
        "  }",
        *[f"  var m{i} = {NEG}; var l{i} = 0.0f;" for i in range(ROWS_PER_THREAD)],
        f"  var acc : array<f32, {ROWS_PER_THREAD * co}>;",
        f"  var s : array<f32, {ROWS_PER_THREAD * c}>;",
        *copy[0],
        f"  for (var kt = 0i; kt < {p.steps}i; kt++) {{",
        "    workgroupBarrier();",
        *copy[1],
        "    workgroupBarrier();",
        *copy[2],
        *[f"    s[{t}] = 0.0f;" for t in range(ROWS_PER_THREAD * c)],
        f"    for (var w = 0i; w < {d4}i; w++) {{",
        *[f"      let q{i} = mlcweb_qs[({rows[i]}) * {sq}i + w];" for i in range(ROWS_PER_THREAD)],
        *[f"      let k{j} = mlcweb_ks[(tx + {LANES * j}i) * {sq}i + w];" for j in range(c)],
        *[f"      s[{i * c + j}] += dot(q{i}, k{j});" for i in range(ROWS_PER_THREAD) for j in range(c)],
        "    }",
    ]
    for i in range(ROWS_PER_THREAD):
        body += [f"    {{ var mx = {NEG};"]
        for j in range(c):
            at = f"s[{i * c + j}]"
            body.append(f"      {at} = select({NEG}, {at}, kt * {p.keys}i + tx + {LANES * j}i < {p.kv_len}i);")
            body.append(f"      mx = max(mx, {at});")
        body += [
            "      mx = max(mx, subgroupShuffleXor(mx, 1u));",
            "      mx = max(mx, subgroupShuffleXor(mx, 2u));",
            "      mx = max(mx, subgroupShuffleXor(mx, 4u));",
            f"      let mnew = max(m{i}, mx * {scale2!r}f);",
            f"      let alpha = exp2(m{i} - mnew);",
            f"      m{i} = mnew;",
            "      var sum = 0.0f;",
        ]
        for j in range(c):
            at = f"s[{i * c + j}]"
            body.append(f"      {at} = exp2({at} * {scale2!r}f - mnew); sum += {at};")
        body.append(f"      l{i} = l{i} * alpha + sum;")
        body += [f"      acc[{i * co + j}] *= alpha;" for j in range(co)]
        body.append("    }")
    for j in range(c):
        probs = ", ".join(f"s[{i * c + j}]" for i in range(ROWS_PER_THREAD))
        body.append(f"    mlcweb_ps[(tx + {LANES * j}i) * {pst}i + ty] = vec4<f32>({probs});")
    body += [
        "    workgroupBarrier();",
        f"    for (var x = 0i; x < {p.keys}i; x++) {{",
        f"      let pr = mlcweb_ps[x * {pst}i + ty];",
    ]
    for j in range(co):
        body.append(f"      {{ let v = mlcweb_vs[x * {dp}i + tx + {LANES * j}i];")
        for i, comp in enumerate("xyzw"):
            body.append(f"        acc[{i * co + j}] += pr.{comp} * v;")
        body.append("      }")
    body += ["    }", "  }"]
    for i in range(ROWS_PER_THREAD):
        body += [
            f"  l{i} += subgroupShuffleXor(l{i}, 1u);",
            f"  l{i} += subgroupShuffleXor(l{i}, 2u);",
            f"  l{i} += subgroupShuffleXor(l{i}, 4u);",
            f"  if (q0 + {rows[i]} < {p.q_len}i) {{",
        ]
        for j in range(co):
            col = f"tx + {LANES * j}i"
            store = f"mlcweb_o(bb, q0 + {rows[i]}, hh, {col}, acc[{i * co + j}] / l{i});"
            body.append(f"    {store}" if (j + 1) * LANES <= d else f"    if ({col} < {d}i) {{ {store} }}")
        body.append("  }")
    nl = "\n"
    return f"""enable f16;
enable subgroups;
// mlcweb: flash attention on the lanes, {p.batch} x {p.heads} heads of {p.q_len} x {p.kv_len} keys x {d},
// {p.rows} rows x {p.keys} keys a step, {p.threads} threads
{declarations}
var<workgroup> mlcweb_qs : array<vec4<f32>, {p.rows * sq}>;
var<workgroup> mlcweb_ks : array<vec4<f32>, {p.keys * sq}>;
var<workgroup> mlcweb_vs : array<f32, {p.keys * dp}>;
var<workgroup> mlcweb_ps : array<vec4<f32>, {p.keys * pst}>;
{helpers}
@compute @workgroup_size({p.threads}, 1, 1)
fn {shader}(@builtin(workgroup_id) wg : vec3<u32>, @builtin(local_invocation_index) li : u32,
        @builtin(subgroup_id) sg : u32, @builtin(subgroup_invocation_id) lane : u32,
        @builtin(subgroup_size) sgsize : u32) {{
  let bb = i32(wg.y) / {p.heads}i;
  let hh = i32(wg.y) % {p.heads}i;
  let q0 = i32(wg.x) * {p.rows}i;
  let tx = i32(lane % {LANES}u);
  let ty = i32(sg * (sgsize / {LANES}u) + lane / {LANES}u);
{nl.join(body)}
}}
"""

"""CUDA source of a Hopper (sm_90a) float16 GEMM on ``wgmma``, with generated operand loads and epilogue.

TVM 0.27's schedule language reaches tensor cores through WMMA and ``mma.sync``. Hopper's warpgroup MMA
(``wgmma.mma_async``) reads both operands from shared memory and runs up to twice as fast
(``benchmarks/README.md`` has the measurements). This module
writes such a kernel as CUDA source; :class:`~mlcweb_passes.WgmmaGemm` fills in, from a fused PrimFunc,
how each operand element is addressed (a linear layer's row, a convolution's padded im2col window) and
the fused epilogue, and attaches the compiled kernels to the module.

The kernel computes ``C[s, m, n] = epilogue(sum_k A[s, m, k] * B[s, n, k])`` in float32:

- a thread block of two warpgroups computes ``128 x block_n`` outputs of batch ``blockIdx.z``, each
  warpgroup 64 rows with ``wgmma.m64n{block_n}k16``;
- 64-wide K tiles go through a ring of ``stages`` shared-memory buffers by ``cp.async``, in the 128-byte
  swizzle the wgmma descriptors name. A load moves 8 consecutive K elements (16 bytes); the generated
  ``a_src`` / ``b_src`` give each one's address, or clear ``ok`` to zero-fill it (past M, N or K, or in
  a convolution's padding);
- the epilogue, generated, stores two neighbouring columns at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BLOCK_K", "BLOCK_M", "THREADS", "WgmmaKernel", "WgmmaTile", "module_source"]

BLOCK_M = 128  # two warpgroups of 64 rows
BLOCK_K = 64  # one 128-byte swizzle row of float16
THREADS = 256


@dataclass(frozen=True)
class WgmmaTile:
    """``block_n`` output columns per block (a multiple of 8, at most 256) over ``stages`` K tiles."""

    block_n: int = 128
    stages: int = 4

    def __post_init__(self) -> None:
        if self.block_n % 8 or not 8 <= self.block_n <= 256:
            raise ValueError(f"block_n must be a multiple of 8 in [8, 256], not {self.block_n}")
        if self.stages < 2:
            raise ValueError(f"stages must be at least 2, not {self.stages}")

    def shared_bytes(self) -> int:
        """Dynamic shared memory: the A and B rings, plus 1 KB to align them to the swizzle."""
        return self.stages * (BLOCK_M + self.block_n) * BLOCK_K * 2 + 1024


@dataclass(frozen=True)
class WgmmaKernel:
    """One generated kernel: its name, tile and GEMM sizes, and the C++ of its parts.

    ``params``: C++ declarations of the kernel's pointer parameters (the PrimFunc's buffers, in order).
    ``a_src`` / ``b_src``: statements that, given ``int s, m, k`` (``n`` for B) and ``bool& ok``, return
    the address of 8 consecutive K elements of row ``m`` (``n``), and clear ``ok`` where they are zeros.
    ``value``: statements returning the stored value for ``float acc, int s, m, n``; ``offset``: returning
    the output element's index for ``int s, m, n``; ``out``: the output pointer's name and element type.
    ``pairs``: whether columns ``n`` and ``n + 1`` (``n`` even) are neighbours in the output.
    ``column_pairs``: the epilogue combines columns ``n`` and ``n + 1`` (``n`` even) into one output
    element: ``value`` then also takes ``float acc1``, column ``n + 1``'s sum, and is called for even ``n``.
    """

    name: str
    tile: WgmmaTile
    batch: int
    m: int
    n: int
    k: int
    params: tuple[str, ...]
    a_src: str
    b_src: str
    value: str
    offset: str
    out: str
    out_type: str
    pairs: bool
    column_pairs: bool = False

    def grid(self) -> tuple[int, int, int]:
        return (-(-self.n // self.tile.block_n), -(-self.m // BLOCK_M), self.batch)

    def io_source(self) -> str:
        """``struct {name}_io``: the kernel's pointers and the generated operand addressing and epilogue, as
        host-and-device code (tests run it on the CPU against TVM's build of the same PrimFunc)."""
        fields = " ".join(f"{p};" for p in self.params)
        acc = "float acc, float acc1" if self.column_pairs else "float acc"
        return f"""
struct {self.name}_io {{
  {fields}
  __host__ __device__ const half* a_src(int s, int m, int k, bool& ok) const {{ {self.a_src} }}
  __host__ __device__ const half* b_src(int s, int n, int k, bool& ok) const {{ {self.b_src} }}
  __host__ __device__ {self.out_type} value({acc}, int s, int m, int n) const {{ {self.value} }}
  __host__ __device__ int offset(int s, int m, int n) const {{ {self.offset} }}
}};
"""

    def source(self) -> str:
        t = self.tile
        pair_type = "half2" if self.out_type == "half" else "float2"
        make_pair = "__halves2half2" if self.out_type == "half" else "make_float2"
        out = f"io.{self.out}"
        store = (
            f"if (n < N) {out}[io.offset(s, m, n)] = io.value(d[i], d[i + 1], s, m, n);"
            if self.column_pairs
            else f"if (n + 1 < N) {{ *reinterpret_cast<{pair_type}*>({out} + io.offset(s, m, n)) = "
            f"{make_pair}(io.value(d[i], s, m, n), io.value(d[i + 1], s, m, n + 1)); }} "
            f"else if (n < N) {{ {out}[io.offset(s, m, n)] = io.value(d[i], s, m, n); }}"
            if self.pairs
            else f"if (n < N) {out}[io.offset(s, m, n)] = io.value(d[i], s, m, n); "
            f"if (n + 1 < N) {out}[io.offset(s, m, n + 1)] = io.value(d[i + 1], s, m, n + 1);"
        )
        regs = t.block_n // 2
        names = ", ".join(p.rsplit(" ", 1)[-1] for p in self.params)
        # Loads run `ahead` K tiles in front of the MMAs. Each step waits for its wgmma, so the next load
        # may reuse the buffer read the step before.
        ahead = t.stages - 1
        return (
            self.io_source()
            + f"""
extern "C" __global__ void __launch_bounds__({THREADS}, 1) {self.name}({", ".join(self.params)}) {{
  constexpr int M = {self.m}, N = {self.n}, K = {self.k}, STAGES = {t.stages}, BN = {t.block_n}, AHEAD = {ahead};
  constexpr int A_BYTES = {BLOCK_M} * {BLOCK_K} * 2, B_BYTES = BN * {BLOCK_K} * 2;
  constexpr int K_TILES = (K + {BLOCK_K - 1}) / {BLOCK_K};
  const {self.name}_io io{{{names}}};
  extern __shared__ __align__(1024) unsigned char shared_raw[];
  const uint32_t base = (smem_addr(shared_raw) + 1023) & ~1023u;
  const int s = blockIdx.z, m0 = blockIdx.y * {BLOCK_M}, n0 = blockIdx.x * BN, warpgroup = threadIdx.x >> 7;
  auto a_src = [&](int m, int k, bool& ok) {{ return io.a_src(s, m, k, ok); }};
  auto b_src = [&](int n, int k, bool& ok) {{ return io.b_src(s, n, k, ok); }};
  auto load = [&](int kt) {{
    if (kt < K_TILES) {{
      const uint32_t a = base + (kt % STAGES) * (A_BYTES + B_BYTES);
      load_tile<{BLOCK_M}>(a, m0, M, kt * {BLOCK_K}, K, a_src);
      load_tile<BN>(a + A_BYTES, n0, N, kt * {BLOCK_K}, K, b_src);
    }}
    asm volatile("cp.async.commit_group;\\n" ::);
  }};
  float d[{regs}];
#pragma unroll
  for (int i = 0; i < {regs}; ++i) d[i] = 0.f;
#pragma unroll
  for (int stage = 0; stage < AHEAD; ++stage) load(stage);
  for (int kt = 0; kt < K_TILES; ++kt) {{
    asm volatile("cp.async.wait_group %0;\\n" ::"n"(AHEAD - 1));  // K tile kt has landed
    asm volatile("fence.proxy.async.shared::cta;\\n" ::: "memory");
    __syncthreads();
    const uint32_t a = base + (kt % STAGES) * (A_BYTES + B_BYTES) + warpgroup * 64 * 128;
    const uint32_t b = base + (kt % STAGES) * (A_BYTES + B_BYTES) + A_BYTES;
    asm volatile("wgmma.fence.sync.aligned;\\n" ::: "memory");
#pragma unroll
    for (int kk = 0; kk < {BLOCK_K // 16}; ++kk) wgmma_n{t.block_n}(d, smem_desc(a + kk * 32), smem_desc(b + kk * 32));
    asm volatile("wgmma.commit_group.sync.aligned;\\n" ::: "memory");
    load(kt + AHEAD);
    asm volatile("wgmma.wait_group.sync.aligned %0;\\n" ::"n"(0) : "memory");
  }}
  asm volatile("wgmma.wait_group.sync.aligned 0;\\n" ::: "memory");
  asm volatile("cp.async.wait_group 0;\\n" ::);
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
#pragma unroll
  for (int i = 0; i < {regs}; i += 2) {{  // wgmma's accumulator layout: rows lane/4 and +8, column pairs
    const int m = m0 + warpgroup * 64 + warp * 16 + (lane >> 2) + ((i >> 1) & 1) * 8;
    const int n = n0 + (i >> 2) * 8 + (lane & 3) * 2;
    if (m < M) {{ {store} }}
  }}
}}
"""
        )


def _wgmma_asm(block_n: int) -> str:
    """``wgmma_n{block_n}``: one m64n{block_n}k16 float16 wgmma on shared-memory descriptors, accumulating
    into ``block_n / 2`` float32 registers."""
    regs = block_n // 2
    operands = ", ".join(f"%{i}" for i in range(regs))
    outputs = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
    return f"""
__device__ __forceinline__ void wgmma_n{block_n}(float* d, uint64_t desc_a, uint64_t desc_b) {{
  asm volatile(
      "{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{regs + 2}, 0;\\n"
      "wgmma.mma_async.sync.aligned.m64n{block_n}k16.f32.f16.f16 "
      "{{{operands}}}, %{regs}, %{regs + 1}, p, 1, 1, 0, 0;\\n}}\\n"
      : {outputs}
      : "l"(desc_a), "l"(desc_b), "r"(1));
}}
"""


_COMMON = r"""
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// A K-major operand in 128-byte swizzle: rows of 64 halves, 8-row atoms 1024 bytes apart.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) |
         ((uint64_t)1 << 62);
}

// ROWS rows of a 64-wide K tile starting at (row0, k0), 16 bytes per copy, into swizzled shared memory.
template <int ROWS, class Src>
__device__ __forceinline__ void load_tile(uint32_t dst, int row0, int rows, int k0, int k_len, Src src) {
#pragma unroll
  for (int it = 0; it < (ROWS * 8 + 255) / 256; ++it) {
    const int index = it * 256 + threadIdx.x;
    if (ROWS * 8 % 256 == 0 || index < ROWS * 8) {
      const int row = index >> 3, chunk = index & 7;
      bool ok = row0 + row < rows && k0 + chunk * 8 < k_len;
      const half* p = src(row0 + row, k0 + chunk * 8, ok);
      const uint32_t to = dst + row * 128 + ((chunk ^ (row & 7)) << 4);
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to), "l"(p), "r"(ok ? 16 : 0));
    }
  }
}
"""


def module_source(kernels: list[WgmmaKernel]) -> str:
    """One CUDA translation unit holding ``kernels`` (compiled together, one module)."""
    widths = sorted({k.tile.block_n for k in kernels})
    return _COMMON + "".join(_wgmma_asm(n) for n in widths) + "".join(k.source() for k in kernels)

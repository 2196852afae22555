// Tensor cores from WebGPU: float16 GEMMs through `chromium-experimental-subgroup-matrix` (Vulkan's
// cooperative matrices), beside the best hand-written multiply-add kernel of f16_math.mjs, same shapes,
// same inputs, same timing. The question before any pass is written: how fast are they through Dawn?
//
// C[M, N] = A[M, K] . B[N, K]^T, float16 in and out, K contiguous in both (an NHWC convolution's or a
// linear layer's GEMM), float32 accumulators (the adapter's f16 -> f32 configuration). Variants:
//   shared-BMxBN-kBK  a workgroup of 8 subgroups takes a BM x BN tile; A's and B's BK-deep slices are
//                     copied to workgroup memory (rows padded by 8 halves), each subgroup multiplies its
//                     (BM/4) x (BN/2) share from there; the float32 results go through a per-subgroup
//                     scratch in workgroup memory to be rounded to float16 and stored
//   direct-BMxBN      the same tiles loaded straight from the storage buffers (no workgroup copies)
//   ...-pf            the next slice's vectors loaded into registers while this slice's multiply-adds run
//                     (one workgroup copy, register double buffering)
//
//   node matrix_gemm.mjs --dawn DIR/webgpu --toggle enable-dawn-features=allow_unsafe_apis,vulkan_enable_f16_on_nvidia
//        --toggle disable-dawn-features=timestamp_quantization [--repeat 20] [--shapes MxNxK,...]
//        [--variants NAME,...] [--out result.json]
// (without the second toggle Dawn rounds timestamps: 65.5 us steps on the H100 of 2026-12-06)
import fs from "node:fs";
import { installDawn, openDevice, parseFlags, runMain } from "./common.mjs";
import { gemmGrid, gemmInputs, gemmShader, timeKernel } from "./f16_math.mjs";

const args = parseFlags({ repeat: 20, toggle: [], shapes: "8192x2560x320,512x1280x11520,65536x256x2304,8192x320x2880,2048x640x5760,16384x512x4608,262144x128x1152", out: "", variants: "" });
const PAD = 8; // halves of padding a workgroup-memory row: 16-byte aligned rows in distinct banks

// bm x bn tiles bk deep; `sg`: the workgroup's subgroups as rows x columns of shares (8 as 4 x 2 unless
// given); `rounds`: the epilogue's scratch holds 1/rounds of the subgroups' result matrices at a time (less
// workgroup memory for deeper tiles)
export const VARIANTS = {
  "shared-128x128-k32": { bm: 128, bn: 128, bk: 32 },
  "shared-128x128-k64": { bm: 128, bn: 128, bk: 64 },
  "shared-64x128-k32": { bm: 64, bn: 128, bk: 32 },
  "shared-128x64-k32": { bm: 128, bn: 64, bk: 32 },
  "shared-64x64-k64": { bm: 64, bn: 64, bk: 64 },
  "shared-64x128-k64": { bm: 64, bn: 128, bk: 64, rounds: 2 },
  "shared-64x128-k64-w4": { bm: 64, bn: 128, bk: 64, sg: [2, 2] },
  "shared-64x128-k32-w4": { bm: 64, bn: 128, bk: 32, sg: [2, 2] },
  "shared-128x128-k32-w4": { bm: 128, bn: 128, bk: 32, sg: [2, 2] },
  "shared-64x256-k32": { bm: 64, bn: 256, bk: 32, rounds: 2 },
  "shared-128x64-k64-w4": { bm: 128, bn: 64, bk: 64, sg: [2, 2] },
  "shared-64x128-k32-pf": { bm: 64, bn: 128, bk: 32, prefetch: true },
  "shared-128x128-k32-pf": { bm: 128, bn: 128, bk: 32, prefetch: true },
  "shared-64x64-k64-pf": { bm: 64, bn: 64, bk: 64, prefetch: true },
  // tiles 48 deep or in scratch turns that fit every adapter's 32 KiB (convolutions: K = 9 x channels)
  "shared-128x128-k48": { bm: 128, bn: 128, bk: 48, rounds: 2 },
  "shared-128x64-k64": { bm: 128, bn: 64, bk: 64, rounds: 2 },
  "shared-64x64-k96": { bm: 64, bn: 64, bk: 96, rounds: 2 },
  "shared-128x128-k64-r8": { bm: 128, bn: 128, bk: 64, rounds: 8 },
  // 320 columns (SD's first UNet level) in two tiles instead of five
  "shared-64x160-k32": { bm: 64, bn: 160, bk: 32 },
  "shared-128x160-k32": { bm: 128, bn: 160, bk: 32 },
  "direct-128x128": { bm: 128, bn: 128, direct: true },
};

/** Workgroup memory of a variant, in bytes (operand tiles and the epilogue's scratch). */
export function workgroupBytes(name, [sm, sn]) {
  const { bm, bn, bk = 16, direct = false, sg = [4, 2], rounds = 1 } = VARIANTS[name];
  const tiles = direct ? 0 : (bm + bn) * (bk + PAD) * 2;
  return tiles + ((sg[0] * sg[1]) / rounds) * sm * sn * 4;
}

/** The WGSL of a subgroup-matrix variant for an M x N x K GEMM with an sm x sn x sk configuration. */
export function matrixShader(name, m, n, k, [sm, sn, sk]) {
  const { bm, bn, bk = 16, direct = false, prefetch = false, sg: [gr, gc] = [4, 2], rounds = 1 } = VARIANTS[name];
  const threads = 32 * gr * gc;
  const [wm, wn] = [bm / gr, bn / gc]; // a subgroup's share
  const [ti, tj] = [wm / sm, wn / sn]; // result matrices a subgroup holds
  const lds = bk + PAD;
  const left = `subgroup_matrix_left<f16, ${sk}, ${sm}>`;
  const right = `subgroup_matrix_right<f16, ${sn}, ${sk}>`;
  const result = `subgroup_matrix_result<f32, ${sn}, ${sm}>`;
  const I = [...Array(ti).keys()];
  const J = [...Array(tj).keys()];
  const lines = [];
  for (const i of I) for (const j of J) lines.push(`  var c${i}_${j} = ${result}();`);
  const body = [];
  if (direct) {
    for (let kk = 0; kk < bk; kk += sk) {
      for (const i of I) body.push(`    let a${i} = subgroupMatrixLoad<${left}>(&A, (row0 + wm + ${i * sm}u) * ${k}u + k0 + ${kk}u, false, ${k}u);`);
      for (const j of J) body.push(`    let b${j} = subgroupMatrixLoad<${right}>(&B, (col0 + wn + ${j * sn}u) * ${k}u + k0 + ${kk}u, true, ${k}u);`);
      for (const i of I) for (const j of J) body.push(`    c${i}_${j} = subgroupMatrixMultiplyAccumulate(a${i}, b${j}, c${i}_${j});`);
    }
  } else {
    // global -> workgroup: vec4 of A and B (bk / 4 a row), 256 threads; with prefetch the vectors of the
    // slice at `next` are loaded into registers v0, v1, ... ahead of the slice's multiply-adds
    const copies = [];
    for (const [buf, shm, rows, origin] of [["A4", "As", bm, "row0"], ["B4", "Bs", bn, "col0"]]) {
      const per = (rows * bk) / 4 / threads;
      for (let l = 0; l < per; l++) {
        const e = `(li + ${l * threads}u)`;
        const [row, q] = [`(${e} / ${bk / 4}u)`, `(${e} % ${bk / 4}u)`];
        copies.push({ load: (at) => `${buf}[(${origin} + ${row}) * ${k / 4}u + ${at} / 4u + ${q}]`, shm, dst: `${row} * ${lds}u + 4u * ${q}` });
      }
    }
    const store = (c, v) => `    { let dst = ${c.dst}; ${c.shm}[dst] = ${v}.x; ${c.shm}[dst + 1u] = ${v}.y; ${c.shm}[dst + 2u] = ${v}.z; ${c.shm}[dst + 3u] = ${v}.w; }`;
    if (prefetch) {
      copies.forEach((c, i) => lines.push(`  var v${i} = ${c.load("0u")};`));
      body.push("    workgroupBarrier();");
      copies.forEach((c, i) => body.push(store(c, `v${i}`)));
      body.push("    workgroupBarrier();");
      body.push(`    let next = min(k0 + ${bk}u, ${k - bk}u);`);
      copies.forEach((c, i) => body.push(`    v${i} = ${c.load("next")};`));
    } else {
      body.push("    workgroupBarrier();");
      copies.forEach((c) => body.push(`    { let v = ${c.load("k0")};`, store(c, "v"), "    }"));
      body.push("    workgroupBarrier();");
    }
    for (let kk = 0; kk < bk; kk += sk) {
      for (const i of I) body.push(`    let a${i}_${kk} = subgroupMatrixLoad<${left}>(&As, (wm + ${i * sm}u) * ${lds}u + ${kk}u, false, ${lds}u);`);
      for (const j of J) body.push(`    let b${j}_${kk} = subgroupMatrixLoad<${right}>(&Bs, (wn + ${j * sn}u) * ${lds}u + ${kk}u, true, ${lds}u);`);
      for (const i of I) for (const j of J) body.push(`    c${i}_${j} = subgroupMatrixMultiplyAccumulate(a${i}_${kk}, b${j}_${kk}, c${i}_${j});`);
    }
  }
  // epilogue: each result matrix through the subgroup's scratch, rounded to float16 by its lanes
  const tile = sm * sn;
  const share = (gr * gc) / rounds; // subgroups whose result matrices the scratch holds at once
  const stores = [];
  for (const i of I) {
    for (const j of J) {
      for (let r = 0; r < rounds; r++) {
        const mine = rounds === 1 ? "" : `if (sg / ${share}u == ${r}u) `;
        const slot = rounds === 1 ? "sg" : `(sg % ${share}u)`;
        stores.push("  workgroupBarrier();");
        stores.push(`  ${mine}{ subgroupMatrixStore(&Cs, ${slot} * ${tile}u, c${i}_${j}, false, ${sn}u); }`);
        stores.push("  workgroupBarrier();");
        stores.push(`  ${mine}{ for (var e = lane; e < ${tile}u; e += 32u) {`);
        stores.push(`    C[(row0 + wm + ${i * sm}u + e / ${sn}u) * ${n}u + col0 + wn + ${j * sn}u + e % ${sn}u] = f16(Cs[${slot} * ${tile}u + e]);`);
        stores.push("  } }");
      }
    }
  }
  const shared = direct
    ? ""
    : `var<workgroup> As : array<f16, ${bm * lds}>;\nvar<workgroup> Bs : array<f16, ${bn * lds}>;\n`;
  const bindings = direct
    ? `@group(0) @binding(0) var<storage, read> A : array<f16>;\n@group(0) @binding(1) var<storage, read> B : array<f16>;`
    : `@group(0) @binding(0) var<storage, read> A4 : array<vec4<f16>>;\n@group(0) @binding(1) var<storage, read> B4 : array<vec4<f16>>;`;
  return `enable f16;
enable subgroups;
enable chromium_experimental_subgroup_matrix;
diagnostic(off, chromium_experimental.subgroup_matrix_uniformity);
${bindings}
@group(0) @binding(2) var<storage, read_write> C : array<f16>;
${shared}var<workgroup> Cs : array<f32, ${share * tile}>;
@compute @workgroup_size(${threads}, 1, 1)
fn main(@builtin(workgroup_id) wg : vec3<u32>, @builtin(local_invocation_index) li : u32,
        @builtin(subgroup_id) sg : u32, @builtin(subgroup_invocation_id) lane : u32) {
  let row0 = wg.y * ${bm}u;
  let col0 = wg.x * ${bn}u;
  let wm = (sg / ${gc}u) * ${wm}u;
  let wn = (sg % ${gc}u) * ${wn}u;
${lines.join("\n")}
  for (var k0 = 0u; k0 < ${k}u; k0 += ${bk}u) {
${body.join("\n")}
  }
${stores.join("\n")}
}
`;
}

/** The adapter's float16 -> float32 configuration, 16x16x16 first ([M, N, K]), or null. */
function chooseConfig(configs) {
  const ok = configs.filter((c) => c.componentType === "f16" && c.resultComponentType === "f32");
  ok.sort((a, b) => (b.M === 16 && b.N === 16) - (a.M === 16 && a.N === 16) || b.M * b.N * b.K - a.M * a.N * a.K);
  return ok.length ? [ok[0].M, ok[0].N, ok[0].K] : null;
}

async function main() {
  await installDawn(args.dawn, args.toggle);
  const { device, info } = await openDevice({ needF16: true, matrix: true });
  const configs = info.subgroupMatrixConfigs.map((c) => ({
    componentType: c.componentType, resultComponentType: c.resultComponentType, M: c.M, N: c.N, K: c.K,
  }));
  const config = chooseConfig(configs);
  const results = { adapter: info.description, features: [...device.features].sort(), configs, config, repeat: Number(args.repeat), shapes: [] };
  console.log(`adapter ${info.description}; subgroup matrices: ${info.subgroupMatrix}; configs ${JSON.stringify(configs)}`);
  for (const shape of args.shapes.split(",")) {
    const { m, n, k, a, b, bufA, bufB, bufC, row } = gemmInputs(device, shape);
    const kernels = [{ name: "simt-f32-k32", code: gemmShader("f32-k32", m, n, k), grid: gemmGrid("f32-k32", m, n) }];
    const only = args.variants ? args.variants.split(",") : Object.keys(VARIANTS);
    if (config && info.subgroupMatrix) {
      for (const name of only) {
        const { bm, bn, bk = 16 } = VARIANTS[name];
        if (m % bm || n % bn || k % bk) continue;
        if (workgroupBytes(name, config) > device.limits.maxComputeWorkgroupStorageSize) {
          console.log(`${name}: needs ${workgroupBytes(name, config)} bytes of workgroup memory, the device gives ${device.limits.maxComputeWorkgroupStorageSize}`);
          continue;
        }
        kernels.push({ name, code: matrixShader(name, m, n, k, config), grid: [n / bn, m / bm, 1] });
      }
    }
    const gemm = { device, a, b, out: bufC, m, n, k, row, shape, repeat: Number(args.repeat) };
    for (const kernel of kernels) await timeKernel(gemm, { ...kernel, buffers: [bufA, bufB, bufC] });
    results.shapes.push(row);
    for (const buf of [bufA, bufB, bufC]) buf.destroy();
  }
  if (args.out) fs.writeFileSync(args.out, JSON.stringify(results, null, 1));
}

if (import.meta.url === `file://${process.argv[1]}`) runMain(main);

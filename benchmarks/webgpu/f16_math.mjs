// Which arithmetic a float16 WebGPU GEMM should use, measured on one kernel shape that only changes its
// multiply-adds: the question behind issue 22's float16 targets, asked before any schedule is written.
//
// One 128x128-tile GEMM, C[M, N] = A[M, K] . B[N, K]^T (float16 in and out, K contiguous in both, as in
// an NHWC convolution or a linear layer), 256 threads of 8x8 outputs, 16-deep reduction steps through
// workgroup memory, the same loads in every variant. The variants differ in the multiply-adds:
//   f32         each float16 operand converted to float32, float32 fma (what TVM emits today)
//   f32-shared  operands converted once, when stored in workgroup memory (twice its bytes)
//   f16x2-L     vec2<f16> fma (two products an instruction), L products (L/2 a lane) summed in float16,
//               then added to a float32 accumulator
// Each variant's GPU time comes from timestamp queries (median of --repeat dispatches); its error is
// the relative RMS of sampled outputs against a float64 reference on the CPU from the same float16 inputs.
//
// Shape variants (float32 multiply-adds): tm x tn outputs a thread (tile 16*tm x 16*tn), reduction steps
// of `step`, and `double`: two workgroup-memory buffers, the next step's global loads issued before this
// step's multiply-adds and stored after them (one barrier a step).
//
// With --tvm DIR, each DIR/<M>x<N>x<K>-<name>.wgsl is timed beside them as variant tvm-<name>: a GEMM
// kernel TVM generated for that shape (webgpu_kernels.py dump), bound as TVM binds it (output, B, A,
// then the uniform packGridDimX) on a grid of N/128 x M/128 workgroups.
//
//   node f16_math.mjs --dawn DIR/webgpu [--toggle enable-dawn-features=vulkan_enable_f16_on_nvidia]
//        [--repeat 20] [--shapes MxNxK,...] [--variants NAME,...] [--tvm DIR] [--out result.json]
import fs from "node:fs";
import { installDawn, median, openDevice, parseFlags, runMain } from "./common.mjs";

// SD1.5's feed-forward linear (64x64 latents, batch 2), a 3x3 convolution at 16x16 (1280 channels) and
// one of the VAE's at 256x256 (256 channels), as GEMMs; M and N multiples of 128, K of 16
const args = parseFlags({ repeat: 20, toggle: [], shapes: "8192x2560x320,512x1280x11520,65536x256x2304", out: "", variants: "" });

const STEP = 16; // default reduction depth of a workgroup-memory step: 4 vec4 per row
// pairs: a thread's rows (and columns) in pairs of adjacent ones 32 apart, as TVM's schedule had them with
// 2 virtual threads of 4 for 8x8 outputs; else one row every 16 (2-way bank conflicts against none)
// scalar-loads: operands bound as array<f16>, each vec4 built from four scalar loads (as TVM's WGSL does);
// loop: the 4 vec4 reads of a step in a WGSL loop instead of written out (TVM's loop over them)
export const VARIANTS = {
  "f32-pairs": { shared: "f16", chain: 0, pairs: true },
  "f32-scalar-loads": { shared: "f16", chain: 0, scalarLoads: true },
  "f32-loop": { shared: "f16", chain: 0, loop: true },
  f32: { shared: "f16", chain: 0 },
  "f32-shared": { shared: "f32", chain: 0 },
};
for (const chain of [4, 8, 16]) VARIANTS[`f16x2-${chain}`] = { shared: "f16", chain };
VARIANTS["f32-k32"] = { shared: "f16", chain: 0, step: 32 };
VARIANTS["f32-double"] = { shared: "f16", chain: 0, double: true };
VARIANTS["f32-double-k32"] = { shared: "f16", chain: 0, double: true, step: 32 };
VARIANTS["f32-8x4"] = { shared: "f16", chain: 0, tn: 4 };
VARIANTS["f32-8x4-double"] = { shared: "f16", chain: 0, tn: 4, double: true };
VARIANTS["f32-4x4"] = { shared: "f16", chain: 0, tm: 4, tn: 4 };
VARIANTS["f16x2-16-double"] = { shared: "f16", chain: 16, double: true };
const WARM_MS = 500;

/** The WGSL of one variant for an M x N x K GEMM (M, N multiples of 128, K of 16). */
export function gemmShader(name, m, n, k) {
  const { shared, chain, pairs, scalarLoads, loop, tm = 8, tn = 8, step = STEP, double = false } = VARIANTS[name];
  const ROW = step / 4 + 1; // vec4 per workgroup-memory row, one of padding (spreads a subgroup's rows over the banks)
  const [tileM, tileN] = [16 * tm, 16 * tn];
  const k4 = k / 4;
  const at = (t, g) => (pairs ? `${t} * 2u + ${(g % 2) + 32 * Math.floor(g / 2)}u` : `${t} + ${16 * g}u`);
  const lines = [];
  const R = [...Array(tm).keys()];
  const C = [...Array(tn).keys()];
  const acc = (r, c) => `c${r}_${c}`;
  for (const r of R) for (const c of C) lines.push(`  var ${acc(r, c)} : f32 = 0.0;`);
  const body = [];
  const flushEvery = chain / 4; // vec4 operands per float16 sum: each gives 4 products, 2 a lane
  const base = double ? "cur + " : "";
  for (let q = 0; q < (loop ? 1 : step / 4); q++) {
    const qi = loop ? "q" : `${q}u`;
    for (const r of R) body.push(`    let a${r}_${q} = As[${base}(${at("ty", r)}) * ${ROW}u + ${qi}];`);
    for (const c of C) body.push(`    let b${c}_${q} = Bs[${base}(${at("tx", c)}) * ${ROW}u + ${qi}];`);
    for (const r of R) {
      for (const c of C) {
        const a = `a${r}_${q}`, b = `b${c}_${q}`, s = acc(r, c);
        if (!chain && shared === "f32") {
          for (const l of "xyzw") body.push(`    ${s} = fma(${a}.${l}, ${b}.${l}, ${s});`);
        } else if (!chain) {
          for (const l of "xyzw") body.push(`    ${s} = fma(f32(${a}.${l}), f32(${b}.${l}), ${s});`);
        } else {
          const t = `t${r}_${c}_${Math.floor(q / flushEvery)}`;
          const first = q % flushEvery === 0;
          body.push(first ? `    var ${t} = ${a}.xy * ${b}.xy;` : `    ${t} = fma(${a}.xy, ${b}.xy, ${t});`);
          body.push(`    ${t} = fma(${a}.zw, ${b}.zw, ${t});`);
          if ((q + 1) % flushEvery === 0) body.push(`    ${s} += f32(${t}.x) + f32(${t}.y);`);
        }
      }
    }
  }
  const stores = [];
  for (const r of R) for (const c of C) stores.push(`  C[(row0 + ${at("ty", r)}) * ${n}u + col0 + ${at("tx", c)}] = f16(${acc(r, c)});`);
  const cast = shared === "f32" ? "vec4<f32>" : "";
  const element = scalarLoads ? "f16" : "vec4<f16>";
  const load = (buf, index) =>
    scalarLoads ? `vec4<f16>(${[0, 1, 2, 3].map((l) => `${buf}[4u * (${index}) + ${l}u]`).join(", ")})` : `${buf}[${index}]`;
  const steps = loop ? [`    for (var q = 0u; q < ${step / 4}u; q++) {`, ...body.map((l) => `  ${l}`), "    }"] : body;
  // global -> workgroup copies: each thread moves `per` vec4 of A and of B a step
  const [perA, perB] = [(tileM * step) / 4 / 256, (tileN * step) / 4 / 256];
  const copy = (into, kk, regs) => {
    const out = [];
    for (const [buf, shm, per, origin] of [["A", "As", perA, "row0"], ["B", "Bs", perB, "col0"]]) {
      for (let l = 0; l < per; l++) {
        const e = `(li + ${l * 256}u)`;
        const [row, q] = [`(${e} / ${step / 4}u)`, `(${e} % ${step / 4}u)`];
        const value = `${cast}(${load(buf, `(${origin} + ${row}) * ${k4}u + ${kk} + ${q}`)})`;
        if (regs === "load") out.push(`    let p${buf}${l} = ${value};`);
        else out.push(`    ${shm}[${into}${row} * ${ROW}u + ${q}] = ${regs === "store" ? `p${buf}${l}` : value};`);
      }
    }
    return out;
  };
  const half = `${tileM * ROW}u`;
  const loopBody = double
    ? [
        "    workgroupBarrier();",
        `    let next = k4 + ${step / 4}u < ${k4}u;`,
        ...copy("", `select(k4, k4 + ${step / 4}u, next)`, "load"),
        ...steps,
        `    let cur2 = ${half} - cur;`,
        ...copy("cur2 + ", "", "store"),
        "    cur = cur2;",
      ]
    : ["    workgroupBarrier();", ...copy("", "k4", "direct"), "    workgroupBarrier();", ...steps];
  const prologue = double ? ["  var cur = 0u;", ...copy("", "0u", "direct")] : [];
  const copies = double ? 2 : 1;
  return `enable f16;
@group(0) @binding(0) var<storage, read> A : array<${element}>;
@group(0) @binding(1) var<storage, read> B : array<${element}>;
@group(0) @binding(2) var<storage, read_write> C : array<f16>;
var<workgroup> As : array<vec4<${shared}>, ${copies * tileM * ROW}>;
var<workgroup> Bs : array<vec4<${shared}>, ${copies * Math.max(tileM, tileN) * ROW}>; // cur offsets both by As' half
@compute @workgroup_size(16, 16, 1)
fn main(@builtin(workgroup_id) wg : vec3<u32>, @builtin(local_invocation_id) lid : vec3<u32>,
        @builtin(local_invocation_index) li : u32) {
  let tx = lid.x;
  let ty = lid.y;
  let row0 = wg.y * ${tileM}u;
  let col0 = wg.x * ${tileN}u;
${lines.join("\n")}
${prologue.join("\n")}
  for (var k4 = 0u; k4 < ${k4}u; k4 += ${step / 4}u) {
${loopBody.join("\n")}
  }
${stores.join("\n")}
}
`;
}

/** Workgroups along N and M of a variant's tiles. */
export function gemmGrid(name, m, n) {
  const { tm = 8, tn = 8 } = VARIANTS[name] ?? {};
  return [n / (16 * tn), m / (16 * tm), 1];
}

// ------------------------------------------------------------------------------------- float16 data
function toHalf(x) {
  const f = new Float32Array([x]);
  const u = new Uint32Array(f.buffer)[0];
  const sign = (u >>> 16) & 0x8000;
  const exp = ((u >>> 23) & 0xff) - 127 + 15;
  const mant = u & 0x7fffff;
  if (exp <= 0) return sign; // flush tiny values: inputs here are never that small
  let h = sign | (exp << 10) | (mant >>> 13);
  if (mant & 0x1000 && (mant & 0x2fff)) h += 1; // round half to even
  return h;
}
export function fromHalf(h) {
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  const v = exp === 0 ? mant * 2 ** -24 : (1 + mant / 1024) * 2 ** (exp - 15);
  return h & 0x8000 ? -v : v;
}
/** `count` uniform float16 values in +-scale: 4096 drawn, then picked by a hash of the index (converting
 * every one of a VAE GEMM's 151 M inputs took most of a device call). */
export function randomHalves(count, scale, seed) {
  let s = seed >>> 0;
  const table = new Uint16Array(4096);
  for (let i = 0; i < table.length; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    table[i] = toHalf(((s / 2 ** 32) * 2 - 1) * scale);
  }
  const out = new Uint16Array(count);
  for (let i = 0; i < count; i++) out[i] = table[(Math.imul(i ^ seed, 0x9e3779b1) >>> 20) & 4095];
  return out;
}

export function buffer(device, data, usage) {
  const buf = device.createBuffer({ size: Math.ceil(data.byteLength / 4) * 4, usage: usage | GPUBufferUsage.COPY_DST });
  device.queue.writeBuffer(buf, 0, data.buffer, data.byteOffset, Math.ceil(data.byteLength / 4) * 4);
  return buf;
}

export async function readHalves(device, src, count) {
  const bytes = Math.ceil((count * 2) / 4) * 4;
  const read = device.createBuffer({ size: bytes, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  const encoder = device.createCommandEncoder();
  encoder.copyBufferToBuffer(src, 0, read, 0, bytes);
  device.queue.submit([encoder.finish()]);
  await read.mapAsync(GPUMapMode.READ);
  const out = new Uint16Array(read.getMappedRange().slice(0));
  read.unmap();
  return out;
}

export async function timeDispatches(device, pipeline, group, grid, repeat) {
  const querySet = device.createQuerySet({ type: "timestamp", count: 2 * repeat });
  const encoder = device.createCommandEncoder();
  for (let i = 0; i < repeat; i++) {
    const pass = encoder.beginComputePass({ timestampWrites: { querySet, beginningOfPassWriteIndex: 2 * i, endOfPassWriteIndex: 2 * i + 1 } });
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, group);
    pass.dispatchWorkgroups(...grid);
    pass.end();
  }
  const bytes = 16 * repeat;
  const resolve = device.createBuffer({ size: bytes, usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC });
  const read = device.createBuffer({ size: bytes, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  encoder.resolveQuerySet(querySet, 0, 2 * repeat, resolve, 0);
  encoder.copyBufferToBuffer(resolve, 0, read, 0, bytes);
  device.queue.submit([encoder.finish()]);
  await read.mapAsync(GPUMapMode.READ);
  const stamps = new BigUint64Array(read.getMappedRange().slice(0));
  read.unmap();
  return [...Array(repeat).keys()].map((i) => Number(stamps[2 * i + 1] - stamps[2 * i]) / 1e6);
}

/** Relative RMS error of sampled outputs against float64 sums of the same float16 inputs. */
export function sampledError(a, b, out, m, n, k, samples = 512) {
  let err = 0;
  let ref = 0;
  for (let s = 0; s < samples; s++) {
    const i = (s * 7919) % m;
    const j = (s * 104729) % n;
    let sum = 0;
    for (let x = 0; x < k; x++) sum += fromHalf(a[i * k + x]) * fromHalf(b[j * k + x]);
    const got = fromHalf(out[i * n + j]);
    err += (got - sum) ** 2;
    ref += sum ** 2;
  }
  return Math.sqrt(err / ref);
}

/** One kernel of an M x N x K GEMM (`gemm`: the device, the float16 inputs `a` and `b`, the output buffer
 * and the result row): its pipeline (a compile error is recorded, with Dawn's messages, and skipped),
 * its GPU time (median of `repeat` after WARM_MS of warm-up) and its sampled error, into
 * `gemm.row.variants[kernel.name]`. */
export async function timeKernel(gemm, { name, code, entry = "main", buffers, grid }) {
  const { device, a, b, out: bufC, m, n, k, row, shape, repeat } = gemm;
  const module = device.createShaderModule({ code });
  let pipeline;
  try {
    pipeline = await device.createComputePipelineAsync({ layout: "auto", compute: { module, entryPoint: entry } });
  } catch (error) {
    const messages = (await module.getCompilationInfo()).messages.map((x) => `${x.lineNum}:${x.linePos} ${x.message}`);
    console.log(`${shape} ${name}: not run (${error.message.split("\n")[0]}) ${messages.slice(0, 3).join(" | ")}`);
    row.variants[name] = { error: error.message.split("\n")[0], messages };
    return;
  }
  const group = device.createBindGroup({
    layout: pipeline.getBindGroupLayout(0),
    entries: buffers.map((buf, binding) => ({ binding, resource: { buffer: buf } })),
  });
  // the GPU busy for WARM_MS first: after idle time (filling the inputs) kernels ran up to 4x slower
  const once = median(await timeDispatches(device, pipeline, group, grid, 3));
  await timeDispatches(device, pipeline, group, grid, Math.min(4000, Math.ceil(WARM_MS / once)));
  const ms = median(await timeDispatches(device, pipeline, group, grid, repeat));
  const error = sampledError(a, b, await readHalves(device, bufC, m * n), m, n, k);
  row.variants[name] = { ms, tflops: row.flops / ms / 1e9, rel_rms: error };
  console.log(`${shape} ${name.padEnd(20)} ${ms.toFixed(3)} ms ${(row.flops / ms / 1e9).toFixed(1)} TFLOPS rel RMS ${error.toExponential(2)}`);
}

/** An "MxNxK" GEMM's float16 inputs (A uniform in +-1, B in +-1/sqrt(K)) on the device, its output
 * buffer and an empty result row. */
export function gemmInputs(device, shape) {
  const [m, n, k] = shape.split("x").map(Number);
  const a = randomHalves(m * k, 1, 1);
  const b = randomHalves(n * k, 1 / Math.sqrt(k), 2);
  const storage = GPUBufferUsage.STORAGE;
  const bufC = device.createBuffer({ size: m * n * 2, usage: storage | GPUBufferUsage.COPY_SRC });
  const row = { m, n, k, flops: 2 * m * n * k, variants: {} };
  return { m, n, k, a, b, bufA: buffer(device, a, storage), bufB: buffer(device, b, storage), bufC, row };
}

async function main() {
  await installDawn(args.dawn, args.toggle);
  const { device, info } = await openDevice({ needF16: true });
  const results = { adapter: info.description, repeat: Number(args.repeat), shapes: [] };
  for (const shape of args.shapes.split(",")) {
    const { m, n, k, a, b, bufA, bufB, bufC, row } = gemmInputs(device, shape);
    const grid = [n / 128, m / 128, 1]; // TVM's kernels: 128x128 tiles
    const only = args.variants ? args.variants.split(",") : Object.keys(VARIANTS);
    const kernels = only.map((name) => ({
      name, code: gemmShader(name, m, n, k), entry: "main", buffers: [bufA, bufB, bufC], grid: gemmGrid(name, m, n),
    }));
    if (args.tvm) {
      const pod = buffer(device, Uint32Array.of(grid[0] * grid[2] - 1, 0, 0, 0), GPUBufferUsage.UNIFORM);
      for (const file of fs.readdirSync(args.tvm).filter((f) => f.startsWith(`${shape}-`) && f.endsWith(".wgsl")).sort()) {
        const code = fs.readFileSync(`${args.tvm}/${file}`, "utf8");
        const entry = /fn (\w+)\(/.exec(code.slice(code.indexOf("@compute")))[1];
        kernels.push({ name: `tvm-${file.slice(shape.length + 1, -5)}`, code, entry, buffers: [bufC, bufB, bufA, pod], grid });
      }
    }
    const gemm = { device, a, b, out: bufC, m, n, k, row, shape, repeat: Number(args.repeat) };
    for (const kernel of kernels) await timeKernel(gemm, kernel);
    results.shapes.push(row);
    for (const buf of [bufA, bufB, bufC]) buf.destroy();
  }
  if (args.out) fs.writeFileSync(args.out, JSON.stringify(results, null, 1));
}

if (import.meta.url === `file://${process.argv[1]}`) runMain(main);

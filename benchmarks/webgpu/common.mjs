// What the node runners share: Dawn as navigator.gpu, a device with the adapter's own limits, weights
// generated on the GPU, and a per-dispatch timestamp profiler. See benchmarks/README.md.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

/** The runners' `--key value` flags over a copy of `defaults` (values as strings); `--toggle` may repeat
 * and collects into an array. */
export function parseFlags(defaults, argv = process.argv.slice(2)) {
  const args = { ...defaults, toggle: [...(defaults.toggle ?? [])] };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "");
    if (key === "toggle") args.toggle.push(argv[i + 1]);
    else args[key] = argv[i + 1];
  }
  return args;
}

/** Dawn (npm `webgpu`, loaded from `dawnDir`) as `navigator.gpu`, with Dawn toggles. */
export async function installDawn(dawnDir, toggles) {
  const { create, globals } = await import(path.resolve(dawnDir, "index.js"));
  Object.assign(globalThis, globals);
  globalThis.navigator = { gpu: create(mergeToggles(toggles)) };
}

/** Dawn's node binding keeps one value a flag (a second `enable-dawn-features=...` replaces the first):
 * the values of repeated flags joined by commas, which it splits. */
export function mergeToggles(toggles) {
  const merged = new Map();
  for (const toggle of toggles) {
    const at = toggle.indexOf("=");
    const [key, value] = at < 0 ? [toggle, ""] : [toggle.slice(0, at), toggle.slice(at + 1)];
    merged.set(key, merged.has(key) && value ? `${merged.get(key)},${value}` : value || merged.get(key) || "");
  }
  return [...merged].map(([key, value]) => (value ? `${key}=${value}` : key));
}

/** A device with the adapter's own limits (tvmjs's detectGPUDevice caps buffers at 1 GiB and asks no
 * timestamp-query), f16, subgroups and timestamps where offered; with a profiler when `profile`. */
export async function openDevice({ profile = false, needF16 = false, matrix = false } = {}) {
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (needF16 && !adapter.features.has("shader-f16")) {
    throw new Error("this adapter has no shader-f16 (on NVIDIA/Vulkan pass --toggle enable-dawn-features=vulkan_enable_f16_on_nvidia)");
  }
  const lim = adapter.limits;
  const { MATRIX_FEATURE } = await pageModule();
  const wanted = ["shader-f16", "subgroups", "timestamp-query", ...(matrix ? [MATRIX_FEATURE] : [])];
  const features = wanted.filter((f) => adapter.features.has(f));
  const device = await adapter.requestDevice({
    requiredFeatures: features,
    requiredLimits: {
      maxBufferSize: lim.maxBufferSize,
      maxStorageBufferBindingSize: lim.maxStorageBufferBindingSize,
      maxComputeWorkgroupStorageSize: lim.maxComputeWorkgroupStorageSize,
      maxStorageBuffersPerShaderStage: lim.maxStorageBuffersPerShaderStage,
      maxComputeInvocationsPerWorkgroup: Math.min(1024, lim.maxComputeInvocationsPerWorkgroup),
    },
  });
  device.addEventListener?.("uncapturederror", (e) => console.error("WebGPU error:", e.error?.message));
  let profiler = null;
  if (profile) {
    if (!device.features.has("timestamp-query")) throw new Error("--profile needs timestamp-query");
    profiler = new Profiler(device);
    profiler.wrap();
  }
  // GPUAdapterInfo's fields are getters: spread copies none of them
  const a = adapter.info || {};
  const info = {
    vendor: a.vendor, architecture: a.architecture, device: a.device, description: a.description,
    subgroupMinSize: a.subgroupMinSize, subgroupMaxSize: a.subgroupMaxSize,
    features: [...adapter.features].sort(), subgroupMatrixConfigs: a.subgroupMatrixConfigs ?? [],
    subgroupMatrix: device.features.has(MATRIX_FEATURE),
    limits: Object.fromEntries(LIMITS_REPORTED.map((k) => [k, lim[k]])),
  };
  return { adapter, device, profiler, info };
}

const LIMITS_REPORTED = [
  "maxComputeWorkgroupStorageSize", "maxComputeInvocationsPerWorkgroup", "maxStorageBufferBindingSize", "maxBufferSize",
];

export const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

// ---------------------------------------------------------------------------------- weights
// Each weight is filled on the GPU from a hash of (its name, element index): the same values in every
// build and dtype of the model (float16 builds get the float32 values rounded), so a float16 build can
// be checked against the float32 one. Scale: uniform in +-1/sqrt(fan-in) (PyTorch's default) for matrices
// and convolution kernels, 1 +- 0.1 for 1-D norm scales, +-0.02 for biases.
const FILL_SHADER = `
struct Params { seed: u32, count: u32, center: f32, halfwidth: f32, dtype16: u32, pad0: u32, pad1: u32, pad2: u32 };
@group(0) @binding(0) var<storage, read_write> out: array<u32>;
@group(0) @binding(1) var<uniform> p: Params;
fn hash(x: u32) -> u32 {
  var h = x * 0x9E3779B1u;
  h = (h ^ (h >> 16u)) * 0x85EBCA6Bu;
  h = (h ^ (h >> 13u)) * 0xC2B2AE35u;
  return h ^ (h >> 16u);
}
fn value(i: u32) -> f32 {
  let u = f32(hash(i ^ hash(p.seed)) >> 8u) / 16777216.0;  // [0, 1)
  return p.center + (2.0 * u - 1.0) * p.halfwidth;
}
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
  let stride = n.x * 256u;
  let words = select(p.count, (p.count + 1u) / 2u, p.dtype16 == 1u);
  for (var w = gid.x; w < words; w += stride) {
    if (p.dtype16 == 1u) {
      let a = value(2u * w);
      let b = select(0.0, value(2u * w + 1u), 2u * w + 1u < p.count);
      out[w] = pack2x16float(vec2<f32>(a, b));
    } else {
      out[w] = bitcast<u32>(value(w));
    }
  }
}`;

function nameSeed(name) {
  let h = 2166136261;
  for (let i = 0; i < name.length; ++i) h = Math.imul(h ^ name.charCodeAt(i), 16777619) >>> 0;
  return h;
}

export function fillRange(rec) {
  const shape = rec.shape;
  const last = rec.name.split("/").pop();
  if (shape.length >= 2) {
    const fanIn = shape.slice(1).reduce((a, b) => a * b, 1);
    return [0, Math.sqrt(1 / fanIn)]; // PyTorch's default init for linear and conv weights
  }
  if (/(weight|gamma|scale)$/.test(last) && !/embed/.test(last)) return [1, 0.1];
  return [0, 0.02];
}

export class WeightFiller {
  constructor(device) {
    this.device = device;
    this.pipeline = device.createComputePipeline({
      layout: "auto",
      compute: { module: device.createShaderModule({ code: FILL_SHADER }), entryPoint: "main" },
    });
  }

  fill(buffer, rec) {
    const count = rec.shape.reduce((a, b) => a * b, 1);
    const [center, halfwidth] = rec.range ?? fillRange(rec);
    const params = new ArrayBuffer(32);
    const u32 = new Uint32Array(params);
    const f32 = new Float32Array(params);
    u32[0] = nameSeed(rec.name);
    u32[1] = count;
    f32[2] = center;
    f32[3] = halfwidth;
    u32[4] = rec.dtype === "float16" ? 1 : 0;
    const uniform = this.device.createBuffer({ size: 32, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST });
    this.device.queue.writeBuffer(uniform, 0, params);
    const group = this.device.createBindGroup({
      layout: this.pipeline.getBindGroupLayout(0),
      entries: [
        { binding: 0, resource: { buffer } },
        { binding: 1, resource: { buffer: uniform } },
      ],
    });
    const encoder = this.device.createCommandEncoder();
    const pass = encoder.beginComputePass();
    pass.setPipeline(this.pipeline);
    pass.setBindGroup(0, group);
    pass.dispatchWorkgroups(Math.min(65535, Math.ceil(count / 256)));
    pass.end();
    this.device.queue.submit([encoder.finish()]);
  }
}

// ---------------------------------------------------------------------------------- profiling
// Every TVM dispatch is its own compute pass: give each pass timestamp writes and remember its pipeline.
export class Profiler {
  constructor(device) {
    this.device = device;
    this.names = new WeakMap();
    this.active = false;
    this.records = [];
    this.capacity = 4096; // Dawn's largest query set
    this.querySet = device.createQuerySet({ type: "timestamp", count: this.capacity });
  }

  wrap() {
    const device = this.device;
    const profiler = this;
    const createPipelineAsync = device.createComputePipelineAsync.bind(device);
    device.createComputePipelineAsync = async (desc) => {
      const pipeline = await createPipelineAsync(desc);
      profiler.names.set(pipeline, desc.compute.entryPoint);
      return pipeline;
    };
    const createPipeline = device.createComputePipeline.bind(device);
    device.createComputePipeline = (desc) => {
      const pipeline = createPipeline(desc);
      profiler.names.set(pipeline, desc.compute.entryPoint);
      return pipeline;
    };
    const createEncoder = device.createCommandEncoder.bind(device);
    device.createCommandEncoder = (desc) => {
      const encoder = createEncoder(desc);
      const begin = encoder.beginComputePass.bind(encoder);
      encoder.beginComputePass = (passDesc = {}) => {
        if (!profiler.active || profiler.records.length * 2 + 2 > profiler.capacity) return begin(passDesc);
        const index = profiler.records.length;
        const pass = begin({
          ...passDesc,
          timestampWrites: { querySet: profiler.querySet, beginningOfPassWriteIndex: 2 * index, endOfPassWriteIndex: 2 * index + 1 },
        });
        const record = { name: "?" };
        profiler.records.push(record);
        const setPipeline = pass.setPipeline.bind(pass);
        pass.setPipeline = (pipeline) => {
          record.name = profiler.names.get(pipeline) || "?";
          setPipeline(pipeline);
        };
        return pass;
      };
      return encoder;
    };
  }

  start() {
    this.records = [];
    this.active = true;
  }

  async stop() {
    this.active = false;
    const n = this.records.length;
    if (n === 0) return [];
    const bytes = 16 * n;
    const resolve = this.device.createBuffer({ size: bytes, usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC });
    const read = this.device.createBuffer({ size: bytes, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    const encoder = this.device.createCommandEncoder();
    encoder.resolveQuerySet(this.querySet, 0, 2 * n, resolve, 0);
    encoder.copyBufferToBuffer(resolve, 0, read, 0, bytes);
    this.device.queue.submit([encoder.finish()]);
    await read.mapAsync(GPUMapMode.READ);
    const stamps = new BigUint64Array(read.getMappedRange().slice(0));
    read.unmap();
    return this.records.map((r, i) => ({ name: r.name, ms: Number(stamps[2 * i + 1] - stamps[2 * i]) / 1e6 }));
  }
}

export function summarise(kernels, top = 25) {
  const byName = new Map();
  let total = 0;
  for (const k of kernels) {
    const e = byName.get(k.name) || { name: k.name, ms: 0, calls: 0 };
    e.ms += k.ms;
    e.calls += 1;
    byName.set(k.name, e);
    total += k.ms;
  }
  const rows = [...byName.values()].sort((a, b) => b.ms - a.ms);
  return { total_ms: total, dispatches: kernels.length, kernels: rows.length, top: rows.slice(0, top).map((r) => ({ ...r, share: r.ms / total })) };
}

/** web/lib/mlcweb.js (the page's module), from the repository or beside this file when packed for the
 * GPU machine: the runners do what the page does with its streamCommands and chooseLibrary. */
async function pageModule() {
  const here = path.dirname(fileURLToPath(import.meta.url));
  const found = [path.join(here, "mlcweb.js"), path.join(here, "..", "..", "web", "lib", "mlcweb.js")].find((f) => fs.existsSync(f));
  return import(found);
}

export async function streamCommands(ctx, every, options = {}) {
  (await pageModule()).streamCommands(ctx, every, options);
}

export async function cacheBindings(ctx) {
  return (await pageModule()).cacheBindings(ctx);
}

/** The library the page would load on this adapter ({ library, needs, subgroups, matrix }); `portable`
 * forces the build's portable one (with its subgroup-matrix kernels where the adapter runs them). */
export async function chooseLibrary(manifest, adapter, portable = false) {
  const { chooseLibrary: choose, chooseMatrix, workgroupNeeds } = await pageModule();
  if (!portable) return choose(manifest, adapter);
  return { library: manifest.library, needs: workgroupNeeds(manifest), subgroups: 0, matrix: chooseMatrix(manifest, adapter) };
}

export async function installMatrixKernels(ctx, table) {
  (await pageModule()).installMatrixKernels(ctx, table);
}

/**
 * Let at most `inFlight` of tvmjs' asynchronous shader creations (shader module and pipeline) run at a
 * time (0 or undefined: no limit, all at once as tvmjs and the page do); the rest wait their turn in the
 * order tvmjs asked. Install before asyncLoadWebGPUPipelines. Returns the limit used. With the driver's
 * shader cache warm, all at once was as fast as 4 at a time and 3x faster than one at a time through Dawn
 * on an H100 (results/2026-12-06-h100-sd_webgpu-10.md).
 */
export function limitPipelineCreation(ctx, inFlight) {
  const limit = inFlight || 0;
  if (limit < 1) return 0;
  const create = ctx.createShaderAsync.bind(ctx);
  const waiting = [];
  let running = 0;
  const next = () => {
    while (running < limit && waiting.length) {
      const job = waiting.shift();
      running += 1;
      job().finally(() => {
        running -= 1;
        next();
      });
    }
  };
  ctx.createShaderAsync = (finfo, code) =>
    new Promise((resolve, reject) => {
      waiting.push(() => Promise.resolve().then(() => create(finfo, code)).then(resolve, reject));
      next();
    });
  return limit;
}

/** Run a runner's async main: exit 0 when it resolves, print the error and exit 1 when it throws. */
export function runMain(main) {
  main().then(
    () => process.exit(0),
    (err) => {
      console.error(err && err.stack ? err.stack : err);
      process.exit(1);
    },
  );
}

// Times an mlcweb Stable Diffusion webgpu build in node, on Dawn (npm `webgpu`) through TVM's JS runtime,
// the way the page runs it, with weights generated on the GPU from the build's tensor-cache.json (no
// shards needed). Writes one JSON result. Run by benchmarks/sd_webgpu.py; see benchmarks/README.md.
//
//   node runner.mjs --build DIR --tvmjs tvmjs.js --dawn DIR/webgpu [--repeat 10] [--steps 20]
//        [--profile] [--toggle enable-dawn-features=vulkan_enable_f16_on_nvidia ...]
//        [--save-outputs out.bin] [--compare ref.bin] --out result.json
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";

const args = parseArgs(process.argv.slice(2));
const require = createRequire(import.meta.url);
const { create, globals } = await import(path.resolve(args.dawn, "index.js"));
Object.assign(globalThis, globals);
globalThis.navigator = { gpu: create(args.toggle) };
const tvmjs = require(path.resolve(args.tvmjs));

function parseArgs(argv) {
  const out = { repeat: 10, steps: 20, toggle: [], profile: false };
  for (let i = 0; i < argv.length; ++i) {
    const key = argv[i].replace(/^--/, "").replace(/-(\w)/g, (_, c) => c.toUpperCase());
    if (key === "profile") out.profile = true;
    else if (key === "toggle") out.toggle.push(argv[++i]);
    else out[key] = argv[++i];
  }
  out.repeat = Number(out.repeat);
  out.steps = Number(out.steps);
  for (const need of ["build", "tvmjs", "dawn", "out"]) {
    if (!out[need]) throw new Error(`runner.mjs: --${need} is required`);
  }
  return out;
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

// ---------------------------------------------------------------------------------- weights
// Each weight is filled on the GPU from a hash of (its name, element index): the same values in every
// build and dtype of the model (float16 builds get the float32 values rounded), so a float16 build can
// be checked against the float32 one. Scale: uniform, standard deviation 1/sqrt(fan-in) for matrices and
// convolution kernels, 1 +- 0.1 for 1-D norm scales, +-0.02 for biases.
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

function fillRange(rec) {
  const shape = rec.shape;
  const last = rec.name.split("/").pop();
  if (shape.length >= 2) {
    const fanIn = shape.slice(1).reduce((a, b) => a * b, 1);
    return [0, Math.sqrt(3 / fanIn)];
  }
  if (/(weight|gamma|scale)$/.test(last) && !/embed/.test(last)) return [1, 0.1];
  return [0, 0.02];
}

class WeightFiller {
  constructor(device) {
    this.device = device;
    this.pipeline = device.createComputePipeline({
      layout: "auto",
      compute: { module: device.createShaderModule({ code: FILL_SHADER }), entryPoint: "main" },
    });
  }

  fill(buffer, rec) {
    const count = rec.shape.reduce((a, b) => a * b, 1);
    const [center, halfwidth] = fillRange(rec);
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
class Profiler {
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

function summarise(kernels, top = 25) {
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

// ---------------------------------------------------------------------------------- the model
async function main() {
  const build = path.resolve(args.build);
  const manifest = JSON.parse(fs.readFileSync(path.join(build, "manifest.json"), "utf8"));
  const cache = JSON.parse(fs.readFileSync(path.join(build, "tensor-cache.json"), "utf8"));
  const sched = JSON.parse(fs.readFileSync(path.join(build, `scheduler-dpm-${args.steps}.json`), "utf8"));
  const result = { build: manifest.model, dtype: manifest.dtype, config: manifest.config, steps: args.steps, repeat: args.repeat, toggles: args.toggle };
  const t0 = performance.now();

  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  result.adapter = { ...(adapter.info || {}), features: [...adapter.features].sort() };
  if (manifest.dtype === "float16" && !adapter.features.has("shader-f16")) {
    throw new Error("this adapter has no shader-f16 (on NVIDIA/Vulkan pass --toggle enable-dawn-features=vulkan_enable_f16_on_nvidia)");
  }
  const wasm = fs.readFileSync(path.join(build, manifest.library));
  const tvm = await tvmjs.instantiate(new Uint8Array(wasm), tvmjs.createPolyfillWASI(), () => {});
  // The adapter's own limits (tvmjs's detectGPUDevice caps buffers at 1 GiB and asks no timestamp-query).
  const lim = adapter.limits;
  const features = ["shader-f16", "subgroups", "timestamp-query"].filter((f) => adapter.features.has(f));
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
  let prof = null;
  if (args.profile) {
    if (!device.features.has("timestamp-query")) throw new Error("--profile needs timestamp-query");
    prof = new Profiler(device);
    prof.wrap();
  }
  tvm.initWebGPU(device);
  const gpu = tvm.webgpu();
  tvm.beginScope();
  const vm = tvm.detachFromCurrentScope(tvm.createVirtualMachine(gpu));
  let t = performance.now();
  await tvm.asyncLoadWebGPUPipelines(vm.getInternalModule());
  result.pipeline_creation_s = (performance.now() - t) / 1000;
  result.wasm_bytes = wasm.length;

  // weights, generated on the GPU
  t = performance.now();
  const filler = new WeightFiller(device);
  let weightBytes = 0;
  for (const shard of cache.records) {
    for (const rec of shard.records) {
      const weight = tvm.detachFromCurrentScope(tvm.empty(rec.shape, rec.dtype, gpu));
      const buffer = tvm.lib.webGPUContext.gpuBufferFromPtr(weight.getDataPtr());
      filler.fill(buffer, rec);
      tvm.tensorCacheUpdate(rec.name, weight);
      weightBytes += rec.nbytes;
    }
  }
  await device.queue.onSubmittedWorkDone();
  result.weights = { bytes: weightBytes, fill_s: (performance.now() - t) / 1000 };

  const fns = new Map();
  const call = (name, ...inputs) => {
    if (!fns.has(name)) {
      const spec = manifest.functions[name];
      fns.set(name, [tvm.detachFromCurrentScope(vm.getFunction(name)), spec.params.map((p) => tvm.detachFromCurrentScope(tvm.tensorCacheGet(p)))]);
    }
    const [fn, params] = fns.get(name);
    return fn(...inputs, ...params);
  };
  const upload = (values, shape, dtype) => {
    const cpu = tvm.empty(shape, dtype, tvm.cpu());
    cpu.copyFrom(values);
    const dev = tvm.empty(shape, dtype, gpu);
    dev.copyFrom(cpu);
    return dev;
  };
  const read = async (tensor) => {
    const cpu = tvm.empty(tensor.shape, tensor.dtype, tvm.cpu());
    cpu.copyFrom(tensor);
    await gpu.sync();
    return cpu.toArray();
  };
  const meta = manifest.metadata;
  const latentShape = meta.latent_shape;
  const latentCount = latentShape.reduce((a, b) => a * b, 1);
  const ids = Int32Array.from({ length: meta.max_length }, (_, i) => (i === 0 ? 49406 : i < 8 ? 320 + i * 37 : 49407));
  const noise = Float32Array.from({ length: latentCount }, (_, i) => Math.sin(i * 12.9898) * 0.8);

  // one timed closure per stage; each ends with a sync, as the page's step does
  const embeddings = (() => {
    const c = call("clip", upload(ids, [1, meta.max_length], "int32"));
    return tvm.detachFromCurrentScope(call("concat_embeddings", c, c));
  })();
  const sample = tvm.detachFromCurrentScope(upload(noise, latentShape, "float32"));
  const zeros = tvm.detachFromCurrentScope(upload(new Float32Array(latentCount), latentShape, "float32"));
  const scale = tvm.detachFromCurrentScope(upload(Float32Array.of(7.5), [], "float32"));
  const timestep = tvm.detachFromCurrentScope(upload(Int32Array.of(sched.timesteps[0]), [], "int32"));
  const coeffs = tvm.detachFromCurrentScope(upload(Float32Array.from(sched.coeffs[0]), [sched.coeffs[0].length], "float32"));
  const eps = tvm.detachFromCurrentScope(call("unet", sample, timestep, embeddings, scale));
  await gpu.sync();

  const stages = {
    clip: () => call("clip", upload(ids, [1, meta.max_length], "int32")),
    unet: () => call("unet", sample, timestep, embeddings, scale),
    scheduler: () => call(sched.function, sample, eps, zeros, coeffs),
    vae: () => call("vae", sample),
  };
  const first = {};
  result.ms = {};
  for (const [name, fn] of Object.entries(stages)) {
    const times = [];
    for (let i = 0; i < args.repeat + 1; ++i) {
      tvm.beginScope();
      const s = performance.now();
      fn();
      await gpu.sync();
      times.push(performance.now() - s);
      tvm.endScope();
    }
    first[name] = times[0];
    result.ms[name] = median(times.slice(1));
  }
  result.first_call_ms = first;

  // a whole image: CLIP twice, the guided UNet and the scheduler per step, the VAE
  const images = [];
  let pixels = null;
  for (let r = 0; r < Math.max(1, Math.floor(args.repeat / 5)); ++r) {
    tvm.beginScope();
    const s = performance.now();
    const cond = call("clip", upload(ids, [1, meta.max_length], "int32"));
    const uncond = call("clip", upload(ids, [1, meta.max_length], "int32"));
    const emb = call("concat_embeddings", uncond, cond);
    let x = upload(noise, latentShape, "float32");
    let prev = zeros;
    for (let i = 0; i < sched.timesteps.length; ++i) {
      const e = call("unet", x, upload(Int32Array.of(sched.timesteps[i]), [], "int32"), emb, scale);
      const out = call(sched.function, x, e, prev, upload(Float32Array.from(sched.coeffs[i]), [sched.coeffs[i].length], "float32"));
      prev = out.get(1);
      x = out.get(0);
      await gpu.sync();
    }
    pixels = await read(call("vae", x));
    images.push(performance.now() - s);
    tvm.endScope();
  }
  result.ms.image = median(images);

  // outputs: finite, and against a reference run of another build on the same weights
  tvm.beginScope();
  const unetOut = await read(call("unet", sample, timestep, embeddings, scale));
  const vaeOut = await read(call("vae", sample));
  tvm.endScope();
  const finite = (a) => a.every((v) => Number.isFinite(v));
  result.finite = { unet: finite(unetOut), vae: finite(vaeOut), image: finite(pixels) };
  result.unet_abs_max = unetOut.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
  const outputs = { unet: Array.from(unetOut), vae: Array.from(vaeOut) };
  if (args.saveOutputs) fs.writeFileSync(args.saveOutputs, JSON.stringify(outputs));
  if (args.compare && fs.existsSync(args.compare)) {
    const ref = JSON.parse(fs.readFileSync(args.compare, "utf8"));
    const maxDiff = (a, b) => a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i])), 0);
    result.against_reference = {
      unet_max_abs: maxDiff(outputs.unet, ref.unet),
      unet_ref_abs_max: ref.unet.reduce((m, v) => Math.max(m, Math.abs(v)), 0),
      vae_max_abs: maxDiff(outputs.vae, ref.vae), // 0..255 RGBA
    };
  }

  if (prof) {
    result.profile = {};
    for (const name of ["unet", "vae", "clip"]) {
      tvm.beginScope();
      stages[name]();
      await gpu.sync();
      prof.start();
      stages[name]();
      await gpu.sync();
      result.profile[name] = summarise(await prof.stop());
      tvm.endScope();
    }
  }
  result.total_s = (performance.now() - t0) / 1000;
  fs.writeFileSync(args.out, JSON.stringify(result, null, 1));
  const f = (x) => x.toFixed(1);
  console.log(`${manifest.dtype}: pipelines ${f(result.pipeline_creation_s)} s, clip ${f(result.ms.clip)} ms, unet ${f(result.ms.unet)} ms, ` +
    `scheduler ${f(result.ms.scheduler)} ms, vae ${f(result.ms.vae)} ms, image ${f(result.ms.image)} ms, finite ${JSON.stringify(result.finite)}`);
  tvm.endScope();
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(err && err.stack ? err.stack : err);
    process.exit(1);
  },
);

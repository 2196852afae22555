// mlcweb.js: load an mlcweb webgpu build in a page.
//
// A build folder holds manifest.json (every file with its sha256), the model library
// (<model>-webgpu.wasm), the tensor cache (tensor-cache.json + params_shard_*.bin) and this file.
// loadModel() checks WebGPU, downloads the weights into the Cache API (checking each shard's
// sha256 against the manifest, so a corrupt or stale cache entry is refetched), instantiates the
// wasm with TVM's JS runtime (tvmjs.bundle.js, loaded as a classic script that defines `tvmjs`)
// and returns a Model whose call(name, ...inputs) runs a compiled function with its weights.

const CACHE_PREFIX = "mlcweb-weights";

/** An error meant for the page's user: `message` says what is wrong, `fix` what to do. */
export class MlcwebError extends Error {
  constructor(message, fix = "") {
    super(fix ? `${message} ${fix}` : message);
    this.name = "MlcwebError";
    this.fix = fix;
  }
}

function mib(bytes) {
  return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

function kib(bytes) {
  return `${(bytes / 1024).toFixed(1)} KiB`;
}

/**
 * Check WebGPU before downloading anything. Returns { adapter, info, hasF16, limits } or throws
 * MlcwebError in plain words: no WebGPU in this browser, no adapter, or limits the model exceeds.
 * `needs` = { maxBufferBytes } is the largest buffer the model binds.
 */
export async function checkWebGPU(needs = {}) {
  if (typeof navigator === "undefined" || !navigator.gpu) {
    throw new MlcwebError(
      "This browser does not offer WebGPU, which this page needs to run the model on your GPU.",
      "Use a recent Chrome or Edge (113+) on a machine with a GPU, or enable WebGPU in your browser's settings (chrome://flags/#enable-unsafe-webgpu); on Linux start Chrome with --enable-unsafe-webgpu.",
    );
  }
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) {
    throw new MlcwebError(
      "This browser has WebGPU turned off, or found no GPU it can use for it.",
      "Turn on hardware acceleration in the browser settings and check that your GPU driver is installed; on Linux, Chrome needs WebGPU switched on (start it with --enable-unsafe-webgpu, or chrome://flags/#enable-unsafe-webgpu).",
    );
  }
  const limits = adapter.limits;
  const need = needs.maxBufferBytes || 0;
  const binding = Math.min(limits.maxStorageBufferBindingSize, limits.maxBufferSize);
  if (need > binding) {
    throw new MlcwebError(
      `This GPU lets a page bind buffers of at most ${mib(binding)}, and the model needs ${mib(need)}.`,
      "Try a machine with a larger GPU, or a smaller build of the model (float16 halves the buffers).",
    );
  }
  const workgroupBytes = needs.workgroupBytes || 0;
  if (workgroupBytes > limits.maxComputeWorkgroupStorageSize) {
    throw new MlcwebError(
      `This GPU gives a shader at most ${kib(limits.maxComputeWorkgroupStorageSize)} of workgroup memory, and the model's kernels need ${kib(workgroupBytes)}.`,
      "Try another browser or GPU: desktop GPUs give 32 KiB.",
    );
  }
  const invocations = needs.invocations || 0;
  if (invocations > limits.maxComputeInvocationsPerWorkgroup) {
    throw new MlcwebError(
      `This GPU runs at most ${limits.maxComputeInvocationsPerWorkgroup} threads in a workgroup, and the model's kernels need ${invocations}.`,
      "Try a machine with another GPU.",
    );
  }
  if (limits.maxStorageBuffersPerShaderStage < 10) {
    throw new MlcwebError(
      `This GPU allows ${limits.maxStorageBuffersPerShaderStage} storage buffers per shader, and TVM's kernels need 10.`,
      "Try a different browser or GPU.",
    );
  }
  const info = adapter.info || {};
  return { adapter, info, hasF16: adapter.features.has("shader-f16"), limits };
}

async function sha256Hex(buffer) {
  const digest = await crypto.subtle.digest("SHA-256", buffer);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

function fileEntry(manifest, path) {
  const entry = manifest.files.find((f) => f.path === path);
  if (!entry) {
    throw new MlcwebError(`${path} is not listed in manifest.json; the build folder is incomplete.`, "Rebuild it.");
  }
  return entry;
}

/**
 * Fetch `path` (relative to `base`) through the Cache API and check it against the manifest's sha256.
 * onBytes(n) is called as bytes arrive. Returns { bytes: ArrayBuffer, cached: boolean }.
 */
export async function fetchChecked(base, manifest, path, { cache = null, onBytes = () => {} } = {}) {
  const entry = fileEntry(manifest, path);
  const url = new URL(path, base).href;
  if (cache) {
    const hit = await cache.match(url);
    if (hit) {
      const bytes = await hit.arrayBuffer();
      if ((await sha256Hex(bytes)) === entry.sha256) {
        onBytes(bytes.byteLength);
        return { bytes, cached: true };
      }
      await cache.delete(url); // stale or corrupt: fetch again
    }
  }
  const response = await fetch(url, { cache: "no-cache" });
  if (!response.ok) {
    throw new MlcwebError(`Could not download ${path} (HTTP ${response.status}).`, "Check that the server is running and the build folder is complete.");
  }
  const reader = response.body.getReader();
  const chunks = [];
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    received += value.byteLength;
    onBytes(value.byteLength);
  }
  const bytes = new Uint8Array(received);
  let offset = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, offset);
    offset += chunk.byteLength;
  }
  if ((await sha256Hex(bytes.buffer)) !== entry.sha256) {
    throw new MlcwebError(`${path} does not match the sha256 in manifest.json (corrupt or partial download).`, "Reload the page; if it persists, rebuild the model.");
  }
  if (cache) await cache.put(url, new Response(bytes.buffer.slice(0)));
  return { bytes: bytes.buffer, cached: false };
}

function bf16ToF32(bytes) {
  const half = new Uint16Array(bytes);
  const out = new Uint32Array(half.length);
  for (let i = 0; i < half.length; ++i) out[i] = half[i] << 16;
  return new Uint8Array(out.buffer);
}

function parseJSON({ bytes }, path) {
  try {
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch (err) {
    throw new MlcwebError(`${path} is not valid JSON (${err.message}).`, "Rebuild the model.");
  }
}

/** What the model's kernels need of a workgroup (the manifest's `webgpu`, written by mlcweb build). */
export function workgroupNeeds(manifest) {
  const webgpu = manifest.webgpu || {};
  return { workgroupBytes: webgpu.workgroup_storage_bytes || 0, invocations: webgpu.invocations_per_workgroup || 0 };
}

/**
 * The library to load: the build's subgroup library (reductions through subgroup operations) when the
 * adapter has the `subgroups` feature and its subgroups are exactly as wide as the library was built for
 * (NVIDIA and Apple GPUs: 32), else the portable one, with its subgroup-matrix kernels where the adapter
 * runs them (chooseMatrix). Returns { library, needs, subgroups, matrix }.
 */
export function chooseLibrary(manifest, adapter) {
  const sg = manifest.subgroups;
  const info = adapter.info || {};
  const limits = adapter.limits || {};
  const fits =
    sg &&
    adapter.features.has("subgroups") &&
    info.subgroupMinSize === sg.subgroup_size &&
    info.subgroupMaxSize === sg.subgroup_size &&
    workgroupNeeds(sg).workgroupBytes <= limits.maxComputeWorkgroupStorageSize;
  const chosen = fits
    ? { library: sg.library, needs: workgroupNeeds(sg), subgroups: sg.subgroup_size, matrix: chooseMatrix(sg, adapter) }
    : { library: manifest.library, needs: workgroupNeeds(manifest), subgroups: 0, matrix: chooseMatrix(manifest, adapter) };
  if (chosen.matrix) {
    chosen.needs = {
      workgroupBytes: Math.max(chosen.needs.workgroupBytes, chosen.matrix.workgroup_storage_bytes || 0),
      invocations: Math.max(chosen.needs.invocations, chosen.matrix.invocations_per_workgroup || 0),
      matrix: true,
    };
  }
  return chosen;
}

export const MATRIX_FEATURE = "chromium-experimental-subgroup-matrix";

/**
 * The library's subgroup-matrix kernels (its `webgpu.matrix` entry: float16 GEMMs on tensor cores) when
 * the adapter offers `chromium-experimental-subgroup-matrix` with their configuration, subgroups exactly
 * as wide as they were written for, and the workgroup memory they declare; else null. Of the entry's
 * tables (its own and those in `larger`, planned for more workgroup memory), the one declaring the most
 * that the adapter grants.
 */
export function chooseMatrix(entry, adapter) {
  const matrix = entry && entry.webgpu && entry.webgpu.matrix;
  if (!matrix || !adapter.features.has(MATRIX_FEATURE) || !adapter.features.has("subgroups")) return null;
  const info = adapter.info || {};
  const want = matrix.config;
  const offered = [...(info.subgroupMatrixConfigs || [])].some(
    (c) => c.componentType === want.componentType && c.resultComponentType === want.resultComponentType && c.M === want.M && c.N === want.N && c.K === want.K,
  );
  const size = info.subgroupMinSize === want.subgroup_size && info.subgroupMaxSize === want.subgroup_size;
  const limits = adapter.limits || {};
  const fits = (table) =>
    (table.workgroup_storage_bytes || 0) <= limits.maxComputeWorkgroupStorageSize &&
    (table.invocations_per_workgroup || 0) <= limits.maxComputeInvocationsPerWorkgroup;
  const tables = [matrix, ...(matrix.larger || [])].filter(fits);
  const most = (a, b) => ((b.workgroup_storage_bytes || 0) > (a.workgroup_storage_bytes || 0) ? b : a);
  return offered && size && tables.length ? tables.reduce(most) : null;
}

/**
 * Run `table`'s kernels (shader name -> { code, grid }, a build's `<library>-matrix.json`) instead of the
 * library's shaders of the same names: each declares the same bindings as the shader it replaces and is
 * dispatched on its own grid. Patches tvmjs' WebGPU context before its pipelines are created.
 */
export function installMatrixKernels(ctx, table) {
  const wrap = (create) => (finfo, code) => {
    const kernel = table[finfo.name];
    if (!kernel) return create(finfo, code);
    const tags = finfo.launch_param_tags.filter((t) => t.startsWith("paramWriteAccess:"));
    const launches = finfo.launch_param_tags.length - tags.length;
    const info = { ...finfo, launch_param_tags: ["blockIdx.x", "blockIdx.y", ...tags] };
    const bind = (submit) => (...args) => submit(...args.slice(0, args.length - launches), kernel.grid[0], kernel.grid[1]);
    const made = create(info, kernel.code);
    return made && typeof made.then === "function" ? made.then(bind) : bind(made);
  };
  ctx.createShader = wrap(ctx.createShader.bind(ctx));
  ctx.createShaderAsync = wrap(ctx.createShaderAsync.bind(ctx));
}

/** "N kernels (G matrix multiplications, A attentions)" for a manifest's matrix entry. */
export function matrixSummary(entry) {
  const parts = [];
  if (entry.gemms) parts.push(`${entry.gemms} matrix multiplication${entry.gemms === 1 ? "" : "s"}`);
  if (entry.attention) parts.push(`${entry.attention} attention${entry.attention === 1 ? "" : "s"}`);
  return `${entry.count} kernel${entry.count === 1 ? "" : "s"}${parts.length ? ` (${parts.join(", ")})` : ""}`;
}

/** The largest buffer the model binds: a weight, or a block of activations its memory plan holds. */
export function largestBuffer(manifest, cacheMeta) {
  let bytes = 0;
  for (const shard of cacheMeta.records) for (const r of shard.records) bytes = Math.max(bytes, r.nbytes);
  for (const mem of Object.values(manifest.memory || {})) bytes = Math.max(bytes, mem.largest_block_bytes);
  return bytes;
}

/**
 * A device with the limits this model needs (its largest buffer, TVM's 10 storage buffers per shader
 * stage, the workgroup memory and size its kernels declare: `needs` from the manifest's `webgpu`, 32 KiB
 * and 1024 threads, capped by the adapter, for builds that do not say) and the features its kernels use
 * where the adapter has them. WebGPU's defaults bind only 128 MiB; asking for more than the model needs
 * would fail on adapters that could run it.
 */
export async function requestDevice(adapter, needBytes, needs = {}) {
  const limits = adapter.limits;
  const binding = Math.max(needBytes, 128 * 2 ** 20);
  const atLeast = (need, fallback, defaultLimit) => Math.max(need || fallback, defaultLimit);
  const requiredLimits = {
    maxStorageBufferBindingSize: Math.min(binding, limits.maxStorageBufferBindingSize),
    maxBufferSize: Math.min(Math.max(binding, 256 * 2 ** 20), limits.maxBufferSize),
    maxStorageBuffersPerShaderStage: Math.min(10, limits.maxStorageBuffersPerShaderStage),
    maxComputeWorkgroupStorageSize: Math.min(atLeast(needs.workgroupBytes, 32 * 1024, 16384), limits.maxComputeWorkgroupStorageSize),
    maxComputeInvocationsPerWorkgroup: Math.min(atLeast(needs.invocations, 1024, 256), limits.maxComputeInvocationsPerWorkgroup),
  };
  const requiredFeatures = ["shader-f16", "subgroups", ...(needs.matrix ? [MATRIX_FEATURE] : [])].filter((f) => adapter.features.has(f));
  try {
    return await adapter.requestDevice({ requiredLimits, requiredFeatures });
  } catch (err) {
    throw new MlcwebError(`This GPU's WebGPU adapter refused the limits the model needs (${err.message}).`, "Try another browser or GPU.");
  }
}

/**
 * Submit tvmjs' batched GPU commands every `every` dispatches. tvmjs encodes every kernel of a call into
 * one command encoder and submits it at the next sync or copy, so the GPU waits while the JS side encodes
 * a whole UNet step (hundreds of dispatches); submitting in pieces lets the GPU start on the first
 * kernels meanwhile (benchmarks/README.md: 18% off a float16 UNet step on an H200). It works through
 * tvmjs' `pendingEncoder` field, which tvmjs reads before it opens each compute pass.
 */
export function streamCommands(ctx, every = 32, { sharePasses = false } = {}) {
  const wrap = (value) => (value && sharePasses ? sharingPasses(value) : value);
  let encoder = wrap(ctx.pendingEncoder);
  let flushing = false;
  Object.defineProperty(ctx, "pendingEncoder", {
    configurable: true,
    get() {
      if (encoder && !flushing && ctx.pendingDispatchCount >= every) {
        flushing = true;
        try {
          ctx.flushCommands();
        } finally {
          flushing = false;
        }
      }
      return encoder;
    },
    set(value) {
      encoder = wrap(value);
    },
  });
}

/**
 * Reuse tvmjs's per-dispatch bindings. For every dispatch tvmjs writes the kernel's scalar arguments into
 * a pooled uniform buffer (`queue.writeBuffer`) and makes a new bind group; a UNet step repeats the same
 * few hundred (kernel, buffers, arguments) each time. This keeps one uniform buffer per distinct argument
 * bytes, written once, puts it in the bind group in place of the pooled one (whose write is then
 * skipped), and keeps each bind group by its layout and buffers. At most `limit` bind groups and as many
 * uniform buffers are kept (all are dropped past it: a new scope's tensors are new buffers). Returns the counts
 * { groups, hits, uniforms } for measurements.
 */
export function cacheBindings(ctx, limit = 8192) {
  const device = ctx.device;
  const pooled = new WeakSet();
  const pending = new WeakMap(); // pooled buffer -> the bytes tvmjs meant to write into it
  const uniforms = new Map(); // argument bytes as a string -> a uniform buffer holding them
  const ids = new WeakMap();
  let nextId = 0;
  const id = (object) => {
    if (!ids.has(object)) ids.set(object, ++nextId);
    return ids.get(object);
  };
  const groups = new Map();
  const stats = { groups: 0, hits: 0, uniforms: 0 };

  const fromPool = ctx.getUniformFromPool.bind(ctx);
  ctx.getUniformFromPool = (nbytes) => {
    const buffer = fromPool(nbytes);
    pooled.add(buffer);
    return buffer;
  };
  const write = device.queue.writeBuffer.bind(device.queue);
  device.queue.writeBuffer = (buffer, offset, data, ...rest) => {
    if (!pooled.has(buffer) || offset !== 0 || rest.length) return write(buffer, offset, data, ...rest);
    pending.set(buffer, new Uint8Array(ArrayBuffer.isView(data) ? data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength) : data.slice(0)));
  };
  const uniformFor = (bytes) => {
    const key = bytes.join(",");
    let buffer = uniforms.get(key);
    if (!buffer) {
      if (uniforms.size >= limit) uniforms.clear(); // arguments that vary call to call (a dynamic shape)
      buffer = device.createBuffer({ size: Math.max(16, Math.ceil(bytes.length / 16) * 16), usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST });
      write(buffer, 0, bytes);
      uniforms.set(key, buffer);
      stats.uniforms = uniforms.size;
    }
    return buffer;
  };
  const create = device.createBindGroup.bind(device);
  device.createBindGroup = (descriptor) => {
    if (!descriptor.entries.every((entry) => entry.resource?.buffer)) return create(descriptor);
    const entries = descriptor.entries.map((entry) => {
      const pooledBytes = pending.get(entry.resource.buffer);
      return pooledBytes ? { ...entry, resource: { ...entry.resource, buffer: uniformFor(pooledBytes) } } : entry;
    });
    const key = [id(descriptor.layout), ...entries.map((e) => `${e.binding}:${id(e.resource.buffer)}:${e.resource.offset ?? 0}:${e.resource.size ?? ""}`)].join("|");
    let group = groups.get(key);
    if (group) {
      stats.hits += 1;
      return group;
    }
    if (groups.size >= limit) groups.clear();
    group = create({ ...descriptor, entries });
    groups.set(key, group);
    stats.groups += 1;
    return group;
  };
  return stats;
}

/**
 * A command encoder whose plain compute passes are one: tvmjs opens and ends a compute pass for every
 * dispatch; this keeps one open across dispatches (WebGPU still makes each dispatch's writes visible to
 * the next) and ends it before any other use of the encoder (copies, finish) or a pass with a
 * descriptor (timestamp writes). `streamCommands(ctx, every, { sharePasses: true })` installs it.
 */
export function sharingPasses(encoder) {
  let open = null;
  const close = () => {
    if (open) open.end();
    open = null;
  };
  const shared = () =>
    new Proxy(open, {
      get(pass, key) {
        if (key === "end") return () => {};
        const value = pass[key];
        return typeof value === "function" ? value.bind(pass) : value;
      },
    });
  return new Proxy(encoder, {
    get(target, key) {
      if (key === "beginComputePass") {
        return (descriptor) => {
          if (descriptor) {
            close();
            return target.beginComputePass(descriptor);
          }
          if (!open) open = target.beginComputePass();
          return shared();
        };
      }
      close();
      const value = target[key];
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
}

/** A compiled model on a WebGPU device. */
export class Model {
  constructor(tvm, vm, device, manifest, info, base) {
    this.base = base;
    this.tvm = tvm;
    this.vm = vm;
    this.device = device;
    this.manifest = manifest;
    this.info = info; // { adapter, hasF16, dtype, message, library, subgroups, matrix }
    this.functions = new Map();
    this.params = new Map();
  }

  /** A JSON file of the build (scheduler constants, tokenizer), checked against its sha256 in the manifest. */
  async fetchJSON(path) {
    return parseJSON(await fetchChecked(this.base, this.manifest, path), path);
  }

  /** Run compiled function `name` on GPU tensors `inputs`, with its weights appended. */
  call(name, ...inputs) {
    const spec = this.manifest.functions[name];
    if (!spec) throw new MlcwebError(`The build has no function ${name}.`);
    if (!this.functions.has(name)) {
      this.functions.set(name, this.tvm.detachFromCurrentScope(this.vm.getFunction(name)));
      // tensorCacheGet returns a new handle in the current scope: detached, or the caller's endScope
      // (each generation's) would dispose it and the next call would fail ("already been disposed").
      const weights = spec.params.map((p) => this.tvm.detachFromCurrentScope(this.tvm.tensorCacheGet(p)));
      this.params.set(name, weights);
    }
    return this.functions.get(name)(...inputs, ...this.params.get(name));
  }

  /** A GPU tensor holding `values` (a typed array) with the given shape and dtype. */
  tensor(values, shape, dtype) {
    const cpu = this.tvm.empty(shape, dtype, this.tvm.cpu());
    cpu.copyFrom(values);
    const gpu = this.tvm.empty(shape, dtype, this.device);
    gpu.copyFrom(cpu);
    return gpu;
  }

  /** Copy a GPU tensor to the CPU and return its values as a typed array. */
  async read(tensor) {
    const cpu = this.tvm.empty(tensor.shape, tensor.dtype, this.tvm.cpu());
    cpu.copyFrom(tensor);
    await this.device.sync();
    return cpu.toArray();
  }

  sync() {
    return this.device.sync();
  }

  /**
   * Submit the commands encoded so far and return a promise that resolves once the GPU has run them (and
   * all before them), without waiting: a caller can encode the next step meanwhile, so the GPU does not
   * idle while the JS side encodes.
   */
  submitted() {
    const ctx = this.tvm.lib.webGPUContext;
    ctx.flushCommands();
    return ctx.device.queue.onSubmittedWorkDone();
  }
}

/**
 * Load the build at `base` (a URL ending in "/"). onProgress({ stage, loaded, total, cached, text })
 * reports the weight download. Returns a Model. Throws MlcwebError with a plain-words message.
 */
export async function loadModel(base, { onProgress = () => {}, log = () => {} } = {}) {
  if (typeof tvmjs === "undefined") {
    throw new MlcwebError("tvmjs.bundle.js was not loaded.", "Load it with a <script> tag before this module.");
  }
  const manifest = await (await fetch(new URL("manifest.json", base), { cache: "no-cache" })).json();
  if (manifest.target !== "webgpu") {
    throw new MlcwebError(`This folder holds a ${manifest.target} build, not a webgpu one.`, "Build with --target webgpu.");
  }
  const cacheMeta = parseJSON(await fetchChecked(base, manifest, "tensor-cache.json"), "tensor-cache.json");
  const needBytes = largestBuffer(manifest, cacheMeta);
  const gpu = await checkWebGPU({ maxBufferBytes: needBytes, ...workgroupNeeds(manifest) });
  const dtype = manifest.dtype;
  if (dtype === "float16" && !gpu.hasF16) {
    const fallback = (manifest.variants || {}).float32;
    if (!fallback) {
      throw new MlcwebError(
        "This build computes in float16, and this GPU's WebGPU adapter lacks the shader-f16 feature.",
        "Open a float32 build instead (mlcweb build ... --target webgpu --dtype float32).",
      );
    }
    log("WebGPU adapter has no shader-f16: loading the float32 variant of this build.");
    const model = await loadModel(new URL(fallback, base), { onProgress, log });
    model.info.message = "This GPU's WebGPU adapter has no shader-f16, so the page runs the float32 build (float32 weights and kernels).";
    return model;
  }
  const message =
    dtype === "float16"
      ? "This GPU's WebGPU adapter has shader-f16, so the page runs the float16 build (float16 weights and kernels)."
      : `The page runs the float32 build (float32 weights and kernels)${gpu.hasF16 ? "; this adapter also has shader-f16, so a float16 build would be smaller and faster" : ""}.`;
  log(message);

  const chosen = chooseLibrary(manifest, gpu.adapter);
  if (chosen.subgroups) log(`The adapter's subgroups are ${chosen.subgroups} wide: loading the library with subgroup reductions.`);
  const wasm = await fetchChecked(base, manifest, chosen.library);
  const tvm = await tvmjs.instantiate(wasm.bytes, tvmjs.createPolyfillWASI(), log);
  tvm.initWebGPU(await requestDevice(gpu.adapter, needBytes, chosen.needs));
  const ctx = tvm.lib.webGPUContext;
  if (ctx && "pendingEncoder" in ctx) streamCommands(ctx);
  // tvmjs writes a uniform and makes a bind group for every dispatch: reusing them cuts the JS time a
  // UNet step takes to encode by a third or more (benchmarks/README.md, eighteenth run)
  if (ctx && typeof ctx.getUniformFromPool === "function") cacheBindings(ctx);
  if (chosen.matrix) {
    installMatrixKernels(ctx, parseJSON(await fetchChecked(base, manifest, chosen.matrix.kernels), chosen.matrix.kernels));
    log(`The adapter offers float16 subgroup matrices: ${matrixSummary(chosen.matrix)} run on them.`);
  }
  const device = tvm.webgpu();
  tvm.beginScope();
  const vm = tvm.detachFromCurrentScope(tvm.createVirtualMachine(device));
  await tvm.asyncLoadWebGPUPipelines(vm.getInternalModule());

  const total = cacheMeta.records.reduce((n, s) => n + s.nbytes, 0);
  let loaded = 0;
  let allCached = true;
  const cache = typeof caches !== "undefined" ? await caches.open(`${CACHE_PREFIX}-${manifest.model}`) : null;
  for (const shard of cacheMeta.records) {
    const { bytes, cached } = await fetchChecked(base, manifest, shard.dataPath, {
      cache,
      onBytes: (n) => {
        loaded += n;
        onProgress({ stage: "weights", loaded, total, cached: allCached, text: `${mib(loaded)} / ${mib(total)}` });
      },
    });
    allCached = allCached && cached;
    for (const rec of shard.records) {
      let raw = new Uint8Array(bytes, rec.byteOffset, rec.nbytes);
      if (rec.format === "f32-to-bf16") raw = bf16ToF32(raw.slice().buffer);
      const cpu = tvm.empty(rec.shape, rec.dtype, tvm.cpu());
      cpu.copyFromRawBytes(raw);
      const weight = tvm.detachFromCurrentScope(tvm.empty(rec.shape, rec.dtype, device));
      weight.copyFrom(cpu);
      tvm.tensorCacheUpdate(rec.name, weight);
    }
    await device.sync();
  }
  tvm.endScope();
  onProgress({ stage: "weights", loaded: total, total, cached: allCached, text: `${mib(total)} ${allCached ? "(from browser cache)" : "(downloaded)"}` });
  const info = { adapter: gpu.info, hasF16: gpu.hasF16, dtype, message, library: chosen.library, subgroups: chosen.subgroups, matrix: chosen.matrix ? chosen.matrix.count : 0, matrixText: chosen.matrix ? matrixSummary(chosen.matrix) : "" };
  return new Model(tvm, vm, device, manifest, info, base);
}

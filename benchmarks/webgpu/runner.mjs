// Times an mlcweb Stable Diffusion webgpu build in node, on Dawn (npm `webgpu`) through TVM's JS runtime,
// the way the page runs it, with weights generated on the GPU from the build's tensor-cache.json (no
// shards needed). Writes one JSON result. Run by benchmarks/sd_webgpu.py; see benchmarks/README.md.
// The model's defaults (metadata.defaults) pick the scheduler, steps and UNet as the page does: SD1.5's
// guided batch-2 `unet` with DPM-Solver++ 20 steps, SD-Turbo's batch-1 `unet_single` with one
// Euler-ancestral step (noise from a fixed pattern). SD1.x and SD2.x builds (one text encoder).
//
//   node runner.mjs --build DIR --tvmjs tvmjs.js --dawn DIR/webgpu [--repeat 10] [--steps N] [--scheduler NAME]
//        [--profile [--profile-top 25]] [--stream N [--share-passes] [--cache-bindings]] [--no-subgroups] [--matrix] [--toggle enable-dawn-features=vulkan_enable_f16_on_nvidia ...]
//        [--save-outputs out.bin] [--compare ref.bin] [--pipelines-in-flight N] [--pipeline-times] [--pipelines-only]
//        --out result.json
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { WeightFiller, cacheBindings, chooseLibrary, installDawn, installMatrixKernels, limitPipelineCreation, median, openDevice, runMain, streamCommands, summarise } from "./common.mjs";

const args = parseArgs(process.argv.slice(2));
const require = createRequire(import.meta.url);
await installDawn(args.dawn, args.toggle);
const tvmjs = require(path.resolve(args.tvmjs));

function parseArgs(argv) {
  const out = { repeat: 10, steps: 0, stream: 0, toggle: [], profile: false };
  for (let i = 0; i < argv.length; ++i) {
    const key = argv[i].replace(/^--/, "").replace(/-(\w)/g, (_, c) => c.toUpperCase());
    if (key === "profile") out.profile = true;
    else if (key === "noSubgroups") out.noSubgroups = true;
    else if (key === "matrix") out.matrix = true;
    else if (key === "pipelineTimes") out.pipelineTimes = true;
    else if (key === "pipelinesOnly") out.pipelinesOnly = true;
    else if (key === "sharePasses") out.sharePasses = true;
    else if (key === "cacheBindings") out.cacheBindings = true;
    else if (key === "toggle") out.toggle.push(argv[++i]);
    else out[key] = argv[++i];
  }
  out.repeat = Number(out.repeat);
  out.steps = Number(out.steps);
  out.stream = Number(out.stream);
  for (const need of ["build", "tvmjs", "dawn", "out"]) {
    if (!out[need]) throw new Error(`runner.mjs: --${need} is required`);
  }
  return out;
}


/**
 * --pipeline-times: each shader module and pipeline made one at a time (createComputePipeline in place
 * of the async call tvmjs makes), each timed; `summary(names)` gives the totals, those of the kernels in
 * `names` (the subgroup-matrix ones) apart, and the 15 slowest.
 */
function timePipelines(device) {
  const modules = new Map();
  const times = [];
  const createModule = device.createShaderModule.bind(device);
  device.createShaderModule = (desc) => {
    const t = performance.now();
    const module = createModule(desc);
    modules.set(module, performance.now() - t);
    return module;
  };
  device.createComputePipelineAsync = async (desc) => {
    const t = performance.now();
    const pipeline = device.createComputePipeline(desc);
    times.push({ name: desc.compute.entryPoint, module_ms: modules.get(desc.compute.module) || 0, pipeline_ms: performance.now() - t });
    return pipeline;
  };
  return {
    summary(names) {
      const special = new Set(names);
      const total = (list) => list.reduce((a, x) => a + x.module_ms + x.pipeline_ms, 0) / 1000;
      const matrix = times.filter((x) => special.has(x.name));
      const slowest = [...times].sort((a, b) => b.module_ms + b.pipeline_ms - a.module_ms - a.pipeline_ms).slice(0, 15);
      return { count: times.length, total_s: total(times), matrix_count: matrix.length, matrix_s: total(matrix), slowest };
    },
  };
}

// ---------------------------------------------------------------------------------- the model
async function main() {
  const build = path.resolve(args.build);
  const manifest = JSON.parse(fs.readFileSync(path.join(build, "manifest.json"), "utf8"));
  const cache = JSON.parse(fs.readFileSync(path.join(build, "tensor-cache.json"), "utf8"));
  const meta = manifest.metadata;
  const defaults = meta.defaults || { scheduler: "dpm", steps: 20, guidance: 7.5, guidance_free: false };
  const schedName = args.scheduler || defaults.scheduler;
  const steps = args.steps || defaults.steps;
  const sched = JSON.parse(fs.readFileSync(path.join(build, `scheduler-${schedName}-${steps}.json`), "utf8"));
  if (!["dpm_solver_step", "ancestral_step"].includes(sched.function)) throw new Error(`runner.mjs: scheduler ${schedName} (${sched.function}) is not supported`);
  if (meta.guidance_embedding || meta.architecture === "sdxl") throw new Error("runner.mjs: LCM and SDXL builds are not supported");
  // the UNet the page calls at the default guidance (sd.js unetCall)
  const guided = !("unet_single" in manifest.functions && (defaults.guidance <= 1 || !("unet" in manifest.functions)));
  const unetName = guided ? "unet" : "unet_single";
  const result = { build: manifest.model, dtype: manifest.dtype, config: manifest.config, scheduler: schedName, steps, unet: unetName, repeat: args.repeat, toggles: args.toggle };
  const t0 = performance.now();

  const { adapter, device, profiler: prof, info } = await openDevice({ profile: args.profile, needF16: manifest.dtype === "float16", matrix: args.matrix });
  result.adapter = info;
  // as the page: the subgroup library where the adapter's subgroups fit it (--no-subgroups: the portable
  // one), and with --matrix its subgroup-matrix kernels where the adapter runs them
  const chosen = await chooseLibrary(manifest, adapter, args.noSubgroups);
  if (args.matrix && !chosen.matrix) throw new Error(`runner.mjs: --matrix, but ${chosen.library} has no subgroup-matrix kernels this adapter runs`);
  result.library = chosen.library;
  result.subgroups = chosen.subgroups;
  result.matrix_kernels = args.matrix ? chosen.matrix.count : 0;
  const wasm = fs.readFileSync(path.join(build, chosen.library));
  const tvm = await tvmjs.instantiate(new Uint8Array(wasm), tvmjs.createPolyfillWASI(), () => {});
  tvm.initWebGPU(device);
  const matrixTable = args.matrix ? JSON.parse(fs.readFileSync(path.join(build, chosen.matrix.kernels), "utf8")) : {};
  if (args.matrix) await installMatrixKernels(tvm.lib.webGPUContext, matrixTable);
  const gpu = tvm.webgpu();
  tvm.beginScope();
  const vm = tvm.detachFromCurrentScope(tvm.createVirtualMachine(gpu));
  // --pipelines-in-flight N: at most N pipelines compiling at once (default 0: all at once, as the page)
  const inFlight = args.pipelinesInFlight === undefined ? undefined : Number(args.pipelinesInFlight);
  result.pipelines_in_flight = limitPipelineCreation(tvm.lib.webGPUContext, inFlight);
  const timings = args.pipelineTimes ? timePipelines(device) : null;
  let t = performance.now();
  await tvm.asyncLoadWebGPUPipelines(vm.getInternalModule());
  result.pipeline_creation_s = (performance.now() - t) / 1000;
  if (timings) result.pipeline_times = timings.summary(Object.keys(matrixTable));
  result.wasm_bytes = wasm.length;
  if (args.pipelinesOnly) {
    fs.writeFileSync(args.out, JSON.stringify(result, null, 1));
    console.log(`pipelines ${result.pipeline_creation_s.toFixed(1)} s (${inFlight ?? "default"} in flight)`);
    return;
  }

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
  const latentShape = meta.latent_shape;
  const latentCount = latentShape.reduce((a, b) => a * b, 1);
  const ids = Int32Array.from({ length: meta.max_length }, (_, i) => (i === 0 ? 49406 : i < 8 ? 320 + i * 37 : 49407));
  const noise = Float32Array.from({ length: latentCount }, (_, i) => Math.sin(i * 12.9898) * 0.8);

  // one timed closure per stage; each ends with a sync, as the page's step does
  const text = (uncond, cond) => (guided ? call("concat_embeddings", uncond, cond) : cond);
  const embeddings = (() => {
    const c = call("clip", upload(ids, [1, meta.max_length], "int32"));
    return tvm.detachFromCurrentScope(text(c, c));
  })();
  const sample = tvm.detachFromCurrentScope(upload(noise, latentShape, "float32"));
  const zeros = tvm.detachFromCurrentScope(upload(new Float32Array(latentCount), latentShape, "float32"));
  const stepNoise = tvm.detachFromCurrentScope(upload(noise.map((x, i) => Math.cos(i * 7.31) * 0.9), latentShape, "float32"));
  const scaleArgs = guided ? [tvm.detachFromCurrentScope(upload(Float32Array.of(Math.max(defaults.guidance, 1)), [], "float32"))] : [];
  const timestep = tvm.detachFromCurrentScope(upload(Int32Array.of(sched.timesteps[0]), [], "int32"));
  const coeffsAt = (i) => upload(Float32Array.from(sched.coeffs[i]), [sched.coeffs[i].length], "float32");
  const coeffs = tvm.detachFromCurrentScope(coeffsAt(0));
  const unet = (x, t, emb) => call(unetName, x, t, emb, ...scaleArgs);
  const eps = tvm.detachFromCurrentScope(unet(sample, timestep, embeddings));
  await gpu.sync();
  // one scheduler step: DPM-Solver++ takes the last model output, Euler ancestral a noise tensor (or zeros)
  const schedulerStep = (i, x, e, prev, row = coeffsAt(i)) => {
    if (sched.function === "ancestral_step") return call(sched.function, x, e, sched.noise[i] ? stepNoise : zeros, row);
    return call(sched.function, x, e, prev, row);
  };

  const stages = {
    clip: () => call("clip", upload(ids, [1, meta.max_length], "int32")),
    unet: () => unet(sample, timestep, embeddings),
    scheduler: () => schedulerStep(0, sample, eps, zeros, coeffs),
    vae: () => call("vae", sample),
  };
  // medians of each stage's wall time (encoding and the GPU's work, to the sync) and of its encoding alone
  // (the JS side: tvmjs' calls into WebGPU, until the call returns)
  const timeStages = async (names) => {
    const ms = {}, firstMs = {}, encodeMs = {};
    for (const name of names) {
      const times = [], encoding = [];
      for (let i = 0; i < args.repeat + 1; ++i) {
        tvm.beginScope();
        const s = performance.now();
        stages[name]();
        encoding.push(performance.now() - s);
        await gpu.sync();
        times.push(performance.now() - s);
        tvm.endScope();
      }
      firstMs[name] = times[0];
      ms[name] = median(times.slice(1));
      encodeMs[name] = median(encoding.slice(1));
    }
    return [ms, firstMs, encodeMs];
  };
  // a whole image: CLIP (twice when guided), the UNet and the scheduler per step, the VAE
  let pixels = null;
  // one step in flight, as the page runs it (sd.js: step i+1 encoded while the GPU runs step i), or with
  // `stepSync` a sync after every step (as the page did until the seventeenth run)
  const ctx = tvm.lib.webGPUContext;
  const timeImage = async (stepSync = false) => {
    const images = [];
    for (let r = 0; r < Math.max(1, Math.floor(args.repeat / 5)); ++r) {
      tvm.beginScope();
      const s = performance.now();
      const cond = call("clip", upload(ids, [1, meta.max_length], "int32"));
      const emb = guided ? text(call("clip", upload(ids, [1, meta.max_length], "int32")), cond) : cond;
      let x = upload(noise.map((v) => v * (sched.init_noise_sigma || 1)), latentShape, "float32");
      let input = sched.input_scales ? upload(noise.map((v) => v * (sched.init_noise_sigma || 1) * sched.input_scales[0]), latentShape, "float32") : x;
      let prev = zeros;
      let inFlight = null;
      for (let i = 0; i < sched.timesteps.length; ++i) {
        const e = unet(input, upload(Int32Array.of(sched.timesteps[i]), [], "int32"), emb);
        const out = schedulerStep(i, x, e, prev);
        prev = out.get(1);
        x = out.get(0);
        input = sched.function === "ancestral_step" ? out.get(1) : x;
        if (stepSync) {
          await gpu.sync();
          continue;
        }
        ctx.flushCommands();
        const done = device.queue.onSubmittedWorkDone();
        if (inFlight) await inFlight;
        inFlight = done;
      }
      if (inFlight) await inFlight;
      pixels = await read(call("vae", x));
      images.push(performance.now() - s);
      tvm.endScope();
    }
    return median(images);
  };
  [result.ms, result.first_call_ms, result.encode_ms] = await timeStages(Object.keys(stages));
  result.ms.image = await timeImage();
  if (args.stream > 0) {
    // the same calls with tvmjs' commands submitted every `stream` dispatches, as web/lib/mlcweb.js does
    await streamCommands(tvm.lib.webGPUContext, args.stream);
    [result.ms_streamed] = await timeStages(["unet", "vae"]);
    result.ms_streamed.image = await timeImage();
    result.ms_streamed.image_step_sync = await timeImage(true);
    result.stream_every = args.stream;
    if (args.cacheBindings) {
      // and with tvmjs's bind groups and uniforms reused (mlcweb.js cacheBindings); the outputs below are
      // computed this way too
      const stats = await cacheBindings(tvm.lib.webGPUContext);
      [result.ms_cached_bindings, , result.encode_ms_cached_bindings] = await timeStages(["unet", "vae"]);
      result.ms_cached_bindings.image = await timeImage();
      result.cached_bindings = { ...stats };
    }
    if (args.sharePasses) {
      // and with one compute pass across dispatches (tvmjs opens one per dispatch); the outputs below are
      // computed this way too
      await streamCommands(tvm.lib.webGPUContext, args.stream, { sharePasses: true });
      [result.ms_shared_passes] = await timeStages(["unet", "vae"]);
      result.ms_shared_passes.image = await timeImage();
    }
  }

  // outputs: finite, and against a reference run of another build on the same weights
  tvm.beginScope();
  const unetOut = await read(unet(sample, timestep, embeddings));
  const vaeOut = await read(call("vae", sample));
  tvm.endScope();
  const finite = (a) => a.every((v) => Number.isFinite(v));
  result.finite = { unet: finite(unetOut), vae: finite(vaeOut), image: finite(pixels) };
  result.unet_abs_max = unetOut.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
  // which weights each function was given: hash-filled values agree between two builds only where these do
  const shapes = new Map(cache.records.flatMap((s) => s.records.map((rec) => [rec.name, rec.shape.join("x")])));
  const weightsOf = (fn) => manifest.functions[fn].params.map((n) => `${n}:${shapes.get(n)}`).join(",");
  const outputs = { unet: Array.from(unetOut), vae: Array.from(vaeOut), weights: { unet: weightsOf(unetName), vae: weightsOf("vae") } };
  if (args.saveOutputs) fs.writeFileSync(args.saveOutputs, JSON.stringify(outputs));
  if (args.compare && fs.existsSync(args.compare)) {
    // A float16 build lifts its weight transforms (casts folded into merged or transposed weights) into
    // tensors of other names and shapes than the float32 build's where fusion differs: such a function's
    // hash-filled weights differ from the reference's, and its outputs are not compared.
    const ref = JSON.parse(fs.readFileSync(args.compare, "utf8"));
    const maxDiff = (a, b) => a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i])), 0);
    const relRms = (a, b) => Math.sqrt(a.reduce((s, v, i) => s + (v - b[i]) ** 2, 0) / b.reduce((s, v) => s + v * v, 0));
    const meanDiff = (a, b) => a.reduce((s, v, i) => s + Math.abs(v - b[i]), 0) / a.length;
    const same = (fn) => ref.weights && ref.weights[fn] === outputs.weights[fn];
    result.against_reference = {
      unet: same("unet")
        ? { rel_rms: relRms(outputs.unet, ref.unet), max_abs: maxDiff(outputs.unet, ref.unet), ref_abs_max: ref.unet.reduce((m, v) => Math.max(m, Math.abs(v)), 0) }
        : { comparable: false },
      vae: same("vae") ? { mean_abs: meanDiff(outputs.vae, ref.vae), max_abs: maxDiff(outputs.vae, ref.vae) } : { comparable: false }, // 0..255 RGBA
    };
  }

  if (prof) {
    // a pass per dispatch again: the profiler stamps each pass
    if (args.sharePasses) await streamCommands(tvm.lib.webGPUContext, args.stream);
    result.profile = {};
    for (const name of ["unet", "vae", "clip"]) {
      tvm.beginScope();
      stages[name]();
      await gpu.sync();
      prof.start();
      stages[name]();
      await gpu.sync();
      result.profile[name] = summarise(await prof.stop(), Number(args.profileTop || 25));
      tvm.endScope();
    }
  }
  result.total_s = (performance.now() - t0) / 1000;
  fs.writeFileSync(args.out, JSON.stringify(result, null, 1));
  const f = (x) => x.toFixed(1);
  console.log(`${manifest.dtype} ${unetName} ${schedName} ${steps}${chosen.subgroups ? ` subgroups ${chosen.subgroups}` : ""}: pipelines ${f(result.pipeline_creation_s)} s, clip ${f(result.ms.clip)} ms, unet ${f(result.ms.unet)} ms, ` +
    `scheduler ${f(result.ms.scheduler)} ms, vae ${f(result.ms.vae)} ms, image ${f(result.ms.image)} ms, finite ${JSON.stringify(result.finite)}`);
  tvm.endScope();
}

runMain(main);

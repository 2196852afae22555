// Times single GEMM, convolution and attention functions of a webgpu build (benchmarks/webgpu_kernels.py
// builds them) in node on Dawn through TVM's JS runtime: GPU time from timestamp queries around every
// dispatch (a GEMM's GEMM kernels, or every kernel where the spec says time: "all"), wall time per call,
// and a sample of each output so variants can be checked against each other.
//
//   node kernels.mjs --build DIR --tvmjs tvmjs.js --dawn DIR/webgpu [--repeat 20] [--warm-ms 500] [--toggle ...]
//     --out result.json
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { installDawn, installMatrixKernels, median, openDevice, parseFlags, runMain, WeightFiller } from "./common.mjs";

const args = parseFlags({ repeat: 20, "warm-ms": 500, toggle: [] });
args.repeat = Number(args.repeat);
const WARM_MS = Number(args["warm-ms"]);
for (const need of ["build", "tvmjs", "dawn", "out"]) {
  if (!args[need]) throw new Error(`kernels.mjs: --${need} is required`);
}
await installDawn(args.dawn, args.toggle);
const tvmjs = createRequire(import.meta.url)(path.resolve(args.tvmjs));
const GEMM = /conv2d|matmul/;
const SAMPLES = 4096;

function halfToFloat(bits) {
  const out = new Float32Array(bits.length);
  for (let i = 0; i < bits.length; ++i) {
    const h = bits[i], s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    out[i] = e === 0 ? s * m * 2 ** -24 : e === 31 ? (m ? NaN : s * Infinity) : s * (1 + m / 1024) * 2 ** (e - 15);
  }
  return out;
}

async function main() {
  const build = path.resolve(args.build);
  const specs = JSON.parse(fs.readFileSync(path.join(build, "specs.json"), "utf8"));
  const matrix = Boolean(specs.matrix); // kernels on subgroup matrices, installed as the page installs them
  const { device, profiler, info } = await openDevice({ profile: true, needF16: specs.dtype.includes("float16"), matrix });
  if (matrix && !info.subgroupMatrix) throw new Error("kernels.mjs: this build's kernels need chromium-experimental-subgroup-matrix (--toggle enable-dawn-features=allow_unsafe_apis)");
  const wasm = fs.readFileSync(path.join(build, specs.library));
  const tvm = await tvmjs.instantiate(new Uint8Array(wasm), tvmjs.createPolyfillWASI(), () => {});
  tvm.initWebGPU(device);
  if (matrix) await installMatrixKernels(tvm.lib.webGPUContext, JSON.parse(fs.readFileSync(path.join(build, specs.matrix), "utf8")));
  const gpu = tvm.webgpu();
  tvm.beginScope();
  const vm = tvm.detachFromCurrentScope(tvm.createVirtualMachine(gpu));
  await tvm.asyncLoadWebGPUPipelines(vm.getInternalModule());
  const filler = new WeightFiller(device);
  const result = { variant: specs.variant, dtype: specs.dtype, adapter: info, repeat: args.repeat, kernels: {} };
  for (const fn of specs.functions) {
    tvm.beginScope();
    const inputs = fn.inputs.map((rec) => {
      const t = tvm.empty(rec.shape, rec.dtype, gpu);
      // attention's q, k and v are activations (unit scale), not weights: filled as weights (1 / sqrt(fan-in)),
      // their outputs would sit below float16's normal range and compare as noise
      const range = fn.time === "all" ? [0, 1] : undefined;
      filler.fill(tvm.lib.webGPUContext.gpuBufferFromPtr(t.getDataPtr()), { ...rec, name: `${fn.name}/${rec.name}`, range });
      return t;
    });
    const f = vm.getFunction(fn.name);
    // each call in its own scope: its output goes back to the VM's pool for the next call to reuse
    const call = () => {
      tvm.beginScope();
      f(...inputs);
      tvm.endScope();
    };
    // Keep the GPU busy for --warm-ms before timing, then time calls queued back to back: kernels that
    // follow idle time (input filling, a sync after each call) ran up to 4x slower (f16_math.mjs timed
    // one kernel at 0.39 and at 1.3-1.9 ms by what ran before it), which made float16 numbers of
    // identical kernels move between runs.
    const warmEnd = performance.now() + WARM_MS;
    while (performance.now() < warmEnd) {
      for (let r = 0; r < 8; ++r) call();
      await gpu.sync();
    }
    profiler.start();
    const start = performance.now();
    for (let r = 0; r < args.repeat; ++r) call();
    await gpu.sync();
    const wallMs = (performance.now() - start) / args.repeat;
    const records = await profiler.stop();
    const gemm = fn.time === "all" ? records : records.filter((k) => GEMM.test(k.name));
    const perCall = [];
    for (let r = 0; r < args.repeat; ++r) {
      const n = gemm.length / args.repeat;
      perCall.push(gemm.slice(r * n, (r + 1) * n).reduce((s, k) => s + k.ms, 0));
    }
    const out = f(...inputs);
    const cpu = tvm.empty(out.shape, out.dtype, tvm.cpu());
    cpu.copyFrom(out);
    await gpu.sync();
    const values = out.dtype === "float16" ? halfToFloat(new Uint16Array(cpu.toRawBytes().buffer)) : cpu.toArray();
    const step = Math.max(1, Math.floor(values.length / SAMPLES));
    const sample = Array.from({ length: Math.min(SAMPLES, values.length) }, (_, i) => Number(values[i * step]));
    const ms = median(perCall);
    result.kernels[fn.name] = {
      gemm_ms: ms,
      wall_ms: wallMs,
      tflops: fn.flops / ms / 1e9,
      dispatches: records.length / args.repeat,
      names: [...new Set(gemm.map((k) => k.name))],
      finite: values.every((v) => Number.isFinite(Number(v))),
      sample,
    };
    console.log(`${specs.variant} ${specs.dtype} ${fn.name}: ${ms.toFixed(3)} ms, ${(fn.flops / ms / 1e9).toFixed(1)} TFLOPS`);
    tvm.endScope();
  }
  fs.writeFileSync(args.out, JSON.stringify(result));
  tvm.endScope();
}

runMain(main);

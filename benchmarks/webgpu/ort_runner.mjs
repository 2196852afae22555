// The peer: onnxruntime-web's WebGPU execution provider on the same Dawn (npm `webgpu`) as runner.mjs,
// timing ONNX exports of the same SD1.5 networks. Writes one JSON result per model.
//
//   node ort_runner.mjs --ort DIR/ort.webgpu.mjs --dawn DIR/webgpu --model unet.onnx [--data unet.onnx.data]
//        --inputs inputs.json --repeat 10 [--toggle ...] --out result.json
//
// inputs.json: [{name, dims, type: "float32" | "float16" | "int64" | "int32"}], filled deterministically.
import fs from "node:fs";
import path from "node:path";
import { mergeToggles } from "./common.mjs";

const args = parseArgs(process.argv.slice(2));
const { create, globals } = await import(path.resolve(args.dawn, "index.js"));
Object.assign(globalThis, globals);
const gpu = create(mergeToggles(args.toggle));
Object.defineProperty(globalThis, "navigator", { value: { gpu }, configurable: true });

// dawn.node's writeBuffer rejects views of a SharedArrayBuffer (ORT's wasm memory): copy those first.
const writeBuffer = globals.GPUQueue.prototype.writeBuffer;
globals.GPUQueue.prototype.writeBuffer = function (buffer, offset, data, dataOffset, size) {
  if (data && data.buffer instanceof SharedArrayBuffer) {
    const copy = new Uint8Array(data.byteLength);
    copy.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    return writeBuffer.call(this, buffer, offset, copy, dataOffset, size);
  }
  return writeBuffer.call(this, buffer, offset, data, dataOffset, size);
};

const ort = await import(path.resolve(args.ort));
ort.env.wasm.numThreads = 1;
ort.env.wasm.proxy = false;

function parseArgs(argv) {
  const out = { repeat: 10, toggle: [] };
  for (let i = 0; i < argv.length; ++i) {
    const key = argv[i].replace(/^--/, "");
    if (key === "toggle") out.toggle.push(argv[++i]);
    else out[key] = argv[++i];
  }
  out.repeat = Number(out.repeat);
  return out;
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

function f32ToF16(v) {
  const f = new Float32Array([v]);
  const x = new Uint32Array(f.buffer)[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = ((x >>> 23) & 0xff) - 127 + 15;
  if (exp <= 0) return sign;
  if (exp >= 31) return sign | 0x7c00;
  return sign | (exp << 10) | ((x >>> 13) & 0x3ff);
}

function makeInput(spec) {
  const count = spec.dims.reduce((a, b) => a * b, 1);
  const value = (i) => Math.sin(i * 12.9898 + spec.name.length) * 0.8;
  switch (spec.type) {
    case "float16":
      return new ort.Tensor("float16", Uint16Array.from({ length: count }, (_, i) => f32ToF16(value(i))), spec.dims);
    case "int64":
      return new ort.Tensor("int64", BigInt64Array.from({ length: count }, () => BigInt(spec.fill ?? 1)), spec.dims);
    case "int32":
      return new ort.Tensor("int32", Int32Array.from({ length: count }, () => spec.fill ?? 1), spec.dims);
    default:
      return new ort.Tensor("float32", Float32Array.from({ length: count }, (_, i) => (spec.fill !== undefined ? spec.fill : value(i))), spec.dims);
  }
}

/** A whole file as bytes, read in 1 GiB pieces: readFileSync stops at 2 GiB (a float32 UNet's weights
 * are 3.4 GB). */
function readLarge(file) {
  const bytes = new Uint8Array(fs.statSync(file).size);
  const fd = fs.openSync(file, "r");
  try {
    for (let at = 0; at < bytes.length; ) at += fs.readSync(fd, bytes, at, Math.min(2 ** 30, bytes.length - at), at);
  } finally {
    fs.closeSync(fd);
  }
  return bytes;
}

async function main() {
  const specs = JSON.parse(fs.readFileSync(args.inputs, "utf8"));
  const options = { executionProviders: ["webgpu"], graphOptimizationLevel: "all" };
  if (args.data) {
    options.externalData = [{ path: path.basename(args.data), data: readLarge(args.data) }];
  }
  let t = performance.now();
  const model = new Uint8Array(fs.readFileSync(args.model));
  const session = await ort.InferenceSession.create(model, options);
  const created = (performance.now() - t) / 1000;
  const feeds = Object.fromEntries(specs.map((s) => [s.name, makeInput(s)]));
  t = performance.now();
  let out = await session.run(feeds);
  const first = performance.now() - t;
  const times = [];
  for (let i = 0; i < args.repeat; ++i) {
    t = performance.now();
    out = await session.run(feeds);
    times.push(performance.now() - t);
  }
  const values = Object.values(out)[0].data;
  let finite = true;
  let nonzero = false;
  for (let i = 0; i < values.length; ++i) {
    const v = typeof values[i] === "number" ? values[i] : Number(values[i]);
    if (!Number.isFinite(v)) finite = false;
    if (v !== 0) nonzero = true;
  }
  const result = { model: path.basename(args.model), session_s: created, first_ms: first, ms: median(times), repeat: args.repeat, finite, nonzero, toggles: args.toggle };
  fs.writeFileSync(args.out, JSON.stringify(result, null, 1));
  console.log(`${result.model}: session ${created.toFixed(1)} s, first ${first.toFixed(1)} ms, median ${result.ms.toFixed(1)} ms, finite ${finite}, nonzero ${nonzero}`);
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(err && err.stack ? err.stack : err);
    process.exit(1);
  },
);

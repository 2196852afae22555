// Compile every WGSL shader of a webgpu build with Dawn/Tint (npm `webgpu`), the way a browser will when
// the page creates its pipelines. Reads {kernel: wgsl} JSON from argv[2]; prints {kernel: error} JSON
// (empty when all compile) on stdout. Run by mlcweb/wgsl_check.py at build time.
//
// Where the adapter has no shader-f16 (SwiftShader on a machine without a GPU), float16 shaders are
// checked with f16 spelled f32: everything but the f16 arithmetic itself is still validated.
//
// With argv[3] "matrix" (kernels on chromium-experimental-subgroup-matrix, which no CPU driver offers),
// the shaders go to Dawn's null backend instead, which offers the feature: Tint parses and validates
// them (types, builtins, uniformity) without a GPU to run them.
import fs from "node:fs";
import path from "node:path";

const [dawnDir, sourcesPath, mode] = process.argv.slice(2);
const { create, globals } = await import(path.resolve(dawnDir, "index.js"));
Object.assign(globalThis, globals);
const matrix = mode === "matrix";
const gpu = create(matrix ? ["backend=null", "enable-dawn-features=allow_unsafe_apis"] : []);
const adapter = await gpu.requestAdapter();
if (!adapter) {
  console.error("no WebGPU adapter (install a Vulkan driver, or Debian's chromium for SwiftShader)");
  process.exit(3);
}
const hasF16 = adapter.features.has("shader-f16");
const wanted = ["shader-f16", "subgroups", ...(matrix ? ["chromium-experimental-subgroup-matrix"] : [])];
const features = wanted.filter((f) => adapter.features.has(f));
if (features.length < wanted.length && matrix) {
  console.error(`Dawn's null backend lacks ${wanted.filter((f) => !features.includes(f)).join(", ")}`);
  process.exit(3);
}
const device = await adapter.requestDevice({ requiredFeatures: features });

function withoutF16(code) {
  return code
    .replace(/^\s*enable f16;\s*$/m, "")
    .replace(/\bf16\b/g, "f32")
    .replace(/(\d(?:\.\d*)?(?:e[+-]?\d+)?)h\b/g, "$1f");
}

const sources = JSON.parse(fs.readFileSync(sourcesPath, "utf8"));
const errors = {};
for (const [name, code] of Object.entries(sources)) {
  const checked = hasF16 ? code : withoutF16(code);
  device.pushErrorScope("validation");
  const module = device.createShaderModule({ code: checked });
  const info = await module.getCompilationInfo();
  const scoped = await device.popErrorScope();
  const messages = info.messages.filter((m) => m.type === "error").map((m) => `line ${m.lineNum}: ${m.message}`);
  if (scoped && !messages.length) messages.push(scoped.message);
  if (messages.length) errors[name] = messages.join("; ");
}
console.log(JSON.stringify({ checked: Object.keys(sources).length, f16: hasF16, errors }));
process.exit(0);

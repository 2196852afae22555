// Known answers for the written flash-attention kernels of a subgroup-matrix table (webgpu_kernels.py
// builds' matrix.json, or a build's <library>-matrix.json): each kernel alone on random float16 q, k, v
// ([B, N, H, D] tensors, or [B, N, parts, H, D] merged projections read as the kernel's helpers say), its
// output checked against a float64 softmax(q k^T scale) v on sampled rows. The timing benches only compare variants with
// each other; this is the check that a kernel computes attention on this adapter (emulation on lavapipe
// cannot show how the driver's subgroup-matrix operations behave).
//
//   node attention_check.mjs --dawn DIR/webgpu --toggle enable-dawn-features=allow_unsafe_apis,vulkan_enable_f16_on_nvidia
//        --tables a/matrix.json,b/matrix.json [--rows 64] [--out result.json]
import fs from "node:fs";
import { installDawn, openDevice, parseFlags, runMain } from "./common.mjs";
import { buffer, fromHalf, randomHalves, readHalves } from "./f16_math.mjs";

const args = parseFlags({ toggle: [], rows: 64, out: "" });

/** What a written kernel's header, helpers and softmax say: sizes, each input's view (parts of a merged
 * projection and which part; 1 and 0 for its own tensor), the base-2 score scale, bindings by name. */
function describe(code) {
  const head = code.match(/flash attention, (\d+) x (\d+) heads of (\d+) x (\d+) keys x (\d+)/);
  const scale2 = code.match(/mx \* ([0-9.e+-]+)f >/);
  if (!head || !scale2) return null; // not an attention kernel
  const [b, h, n, nk, d] = head.slice(1).map(Number);
  const views = {};
  for (const x of "qkv") {
    const helper = code.match(new RegExp(`fn mlcweb_${x}4\\(.*`))?.[0] ?? "";
    const view = helper.match(/\(bb \* \d+i \+ n\) \* (\d+)i \+ (\d+)i\)/);
    views[x] = view ? { parts: Number(view[1]), part: Number(view[2]) } : { parts: 1, part: 0 };
  }
  const bindings = {};
  for (const m of code.matchAll(/@binding\((\d+)\) var<storage, [a-z_, ]+> (\w)\w* :/g)) bindings[m[2]] = Number(m[1]);
  return { b, h, n, nk, d, views, scale: Number(scale2[1]) / Math.LOG2E, bindings };
}

function reference(a, q, k, v, bi, ni, hi) {
  const { h, n, nk, d, scale, views } = a;
  const at = (x, view, len, bb, row, c) => fromHalf(x[(((bb * len + row) * view.parts + view.part) * h + hi) * d + c]);
  const s = new Float64Array(nk);
  let mx = -Infinity;
  for (let j = 0; j < nk; j++) {
    let dot = 0;
    for (let c = 0; c < d; c++) dot += at(q, views.q, n, bi, ni, c) * at(k, views.k, nk, bi, j, c);
    s[j] = dot * scale;
    mx = Math.max(mx, s[j]);
  }
  let sum = 0;
  for (let j = 0; j < nk; j++) sum += (s[j] = Math.exp(s[j] - mx));
  const out = new Float64Array(d);
  for (let j = 0; j < nk; j++) for (let c = 0; c < d; c++) out[c] += (s[j] / sum) * at(v, views.v, nk, bi, j, c);
  return out;
}

async function check(device, name, entry) {
  const a = describe(entry.code);
  if (!a) return null;
  const q = randomHalves(a.b * a.n * a.views.q.parts * a.h * a.d, 1, 11);
  const k = randomHalves(a.b * a.nk * a.views.k.parts * a.h * a.d, 1, 12);
  const v = randomHalves(a.b * a.nk * a.views.v.parts * a.h * a.d, 1, 13);
  const o = new Uint16Array(a.b * a.n * a.h * a.d);
  const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC;
  const data = { q, k, v, o };
  const bufs = Object.fromEntries(Object.entries(data).map(([key, x]) => [key, buffer(device, x, usage)]));
  const module = device.createShaderModule({ code: entry.code });
  const pipeline = device.createComputePipeline({ layout: "auto", compute: { module, entryPoint: name } });
  const group = device.createBindGroup({
    layout: pipeline.getBindGroupLayout(0),
    entries: Object.entries(a.bindings).map(([key, binding]) => ({ binding, resource: { buffer: bufs[key] } })),
  });
  const encoder = device.createCommandEncoder();
  const pass = encoder.beginComputePass();
  pass.setPipeline(pipeline);
  pass.setBindGroup(0, group);
  pass.dispatchWorkgroups(...entry.grid);
  pass.end();
  device.queue.submit([encoder.finish()]);
  const got = await readHalves(device, bufs.o, o.length);
  let err2 = 0, ref2 = 0, worst = 0;
  for (let i = 0; i < args.rows; i++) {
    const bi = i % a.b, hi = (i * 7) % a.h, ni = Math.floor((i * 2654435761) % a.n);
    const want = reference(a, q, k, v, bi, ni, hi);
    for (let c = 0; c < a.d; c++) {
      const diff = fromHalf(got[((bi * a.n + ni) * a.h + hi) * a.d + c]) - want[c];
      err2 += diff * diff;
      ref2 += want[c] * want[c];
      worst = Math.max(worst, Math.abs(diff));
    }
  }
  return { shape: [a.b, a.n, a.nk, a.h, a.d], rel_rms: Math.sqrt(err2 / ref2), max_abs: worst };
}

runMain(async () => {
  await installDawn(args.dawn, args.toggle);
  const { device } = await openDevice({ needF16: true, matrix: true });
  const results = {};
  for (const table of args.tables.split(",")) {
    const kernels = JSON.parse(fs.readFileSync(table, "utf8"));
    for (const [name, entry] of Object.entries(kernels.kernels ?? kernels)) {
      const r = await check(device, name, entry);
      if (!r) continue;
      results[`${table}:${name}`] = r;
      console.log(`${table} ${name} ${JSON.stringify(r.shape)}: rel. RMS ${r.rel_rms.toExponential(2)}, max |err| ${r.max_abs.toExponential(2)}`);
    }
    // after every table, so a run cut short keeps what it checked (written aside, then renamed)
    if (args.out) {
      fs.writeFileSync(`${args.out}.tmp`, JSON.stringify(results, null, 1));
      fs.renameSync(`${args.out}.tmp`, args.out);
    }
  }
});

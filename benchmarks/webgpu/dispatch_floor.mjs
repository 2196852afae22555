// What one dispatch costs through Dawn, whatever its kernel does. In the float16 UNet's profile on an
// H100 the smallest kernels (a cast, a transpose of a few KiB) take 8.7-10 us each and a step is 534
// dispatches, so the floor alone could be a seventh of the step. This times chains of a trivial kernel
// (64 workgroups of 64 invocations, each reading one float and writing one) submitted in one command
// buffer, per dispatch, in four layouts:
//   pass-dependent    each dispatch in its own compute pass, reading what the one before wrote (as tvmjs
//                     encodes a model: a pass per kernel)
//   one-pass-dependent  the same chain in one compute pass
//   pass-independent  a pass per dispatch, each writing a buffer of its own (nothing to wait for)
//   one-pass-independent
// and "tvmjs-like": pass-dependent with a uniform written (queue.writeBuffer) and a bind group made for
// every dispatch, as tvmjs does. Wall time from submit to onSubmittedWorkDone, and the JS time to encode
// the chain, each a median of --repeat.
//
//   node dispatch_floor.mjs --dawn DIR/webgpu [--toggle T ...] [--count 512] [--repeat 9] [--out result.json]
import fs from "node:fs";
import { installDawn, median, openDevice, parseFlags, runMain } from "./common.mjs";

const args = parseFlags({ count: 512, repeat: 9, toggle: [], out: "" });

const SHADER = `
@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<uniform> p: vec4<u32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
  dst[id.x] = src[(id.x + p.x) % 4096u] + 1.0;
}`;

async function main() {
  await installDawn(args.dawn, args.toggle);
  const { device, info } = await openDevice();
  const count = Number(args.count);
  const module = device.createShaderModule({ code: SHADER });
  const pipeline = device.createComputePipeline({ layout: "auto", compute: { module, entryPoint: "main" } });
  const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST;
  const buffers = Array.from({ length: count + 1 }, () => device.createBuffer({ size: 4096 * 4, usage }));
  const uniform = device.createBuffer({ size: 16, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST });
  const group = (src, dst, u = uniform) =>
    device.createBindGroup({
      layout: pipeline.getBindGroupLayout(0),
      entries: [{ binding: 0, resource: { buffer: src } }, { binding: 1, resource: { buffer: dst } }, { binding: 2, resource: { buffer: u } }],
    });
  // dependent: ping-pong between two buffers; independent: buffer 0 into a buffer of each dispatch's own
  const chain = Array.from({ length: count }, (_, i) => group(buffers[i % 2], buffers[(i + 1) % 2]));
  const spread = Array.from({ length: count }, (_, i) => group(buffers[0], buffers[i + 1]));
  const uniforms = Array.from({ length: 8 }, () => device.createBuffer({ size: 16, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST }));

  const encode = (groups, onePass, tvmjsLike = false) => {
    const encoder = device.createCommandEncoder();
    let pass = onePass ? encoder.beginComputePass() : null;
    for (let i = 0; i < count; i++) {
      if (!onePass) pass = encoder.beginComputePass();
      pass.setPipeline(pipeline);
      let bind = groups[i];
      if (tvmjsLike) {
        const u = uniforms[i % uniforms.length];
        device.queue.writeBuffer(u, 0, new Uint32Array([i, 0, 0, 0]));
        bind = group(buffers[i % 2], buffers[(i + 1) % 2], u);
      }
      pass.setBindGroup(0, bind);
      pass.dispatchWorkgroups(64);
      if (!onePass) pass.end();
    }
    if (onePass) pass.end();
    return encoder.finish();
  };

  // [GPU: submit to done, JS: encoding], us a dispatch
  const time = async (make) => {
    const gpu = [], js = [];
    for (let r = 0; r < Number(args.repeat) + 1; r++) {
      const e0 = performance.now();
      const commands = make();
      const e1 = performance.now();
      await device.queue.onSubmittedWorkDone();
      const t0 = performance.now();
      device.queue.submit([commands]);
      await device.queue.onSubmittedWorkDone();
      if (r > 0) {
        gpu.push(performance.now() - t0);
        js.push(e1 - e0);
      }
    }
    return [(median(gpu) * 1000) / count, (median(js) * 1000) / count];
  };

  const modes = {
    "pass-dependent": () => encode(chain, false),
    "one-pass-dependent": () => encode(chain, true),
    "pass-independent": () => encode(spread, false),
    "one-pass-independent": () => encode(spread, true),
    "tvmjs-like": () => encode(chain, false, true),
  };
  const results = {}, encoding = {};
  for (const [name, make] of Object.entries(modes)) [results[name], encoding[name]] = await time(make);
  for (const name of Object.keys(modes)) {
    console.log(`${name}: ${results[name].toFixed(2)} us a dispatch on the GPU, ${encoding[name].toFixed(2)} us to encode (${count} dispatches)`);
  }
  const out = { adapter: info, count, repeat: Number(args.repeat), us_per_dispatch: results, encode_us_per_dispatch: encoding };
  if (args.out) fs.writeFileSync(args.out, JSON.stringify(out, null, 1));
}

runMain(main);

// Stable Diffusion in the page: CLIP tokenizer -> clip -> UNet + scheduler loop -> VAE -> canvas.
//
// The host loop mirrors mlcweb_stable_diffusion.schedulers.HostLoop (docs/stable_diffusion.md): each
// step runs the compiled `unet` (classifier-free guidance inside) and the scheduler's step function
// with that step's coefficients from scheduler-<name>-<steps>.json.
//
// For scripts and tests the page exposes window.mlcwebSD = { ready, generate(options) }; options may
// carry `latents` (a Float32Array) to start from given noise instead of the seeded generator.

import { loadModel, MlcwebError, checkWebGPU } from "./mlcweb.js";
import { ClipTokenizer, MAX_LENGTH } from "./clip_tokenizer.js";
import { checkRequest } from "./request.js";

const $ = (id) => document.getElementById(id);

function showError(err) {
  const plain = err instanceof MlcwebError;
  $("error-title").textContent = plain ? err.message.replace(err.fix, "").trim() : `Something went wrong: ${err.message || err}`;
  $("error-fix").textContent = plain ? err.fix : "See the browser console for details.";
  $("error").classList.add("shown");
  document.body.dataset.state = "error";
  console.error(err);
}

/** Standard normal samples from a seeded generator (mulberry32 + Box-Muller; not torch.randn's stream). */
export function seededNormal(count, seed) {
  let state = seed >>> 0;
  const uniform = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const out = new Float32Array(count);
  for (let i = 0; i < count; i += 2) {
    const r = Math.sqrt(-2 * Math.log(1 - uniform()));
    const theta = 2 * Math.PI * uniform();
    out[i] = r * Math.cos(theta);
    if (i + 1 < count) out[i + 1] = r * Math.sin(theta);
  }
  return out;
}

class StableDiffusion {
  constructor(model, tokenizer) {
    this.model = model;
    this.tokenizer = tokenizer;
    this.meta = model.manifest.metadata;
    this.constants = new Map();
  }

  schedules() {
    return this.model.manifest.files
      .map((f) => /^scheduler-(\w+)-(\d+)\.json$/.exec(f.path))
      .filter(Boolean)
      .map((m) => ({ name: m[1], steps: Number(m[2]), path: m[0] }))
      .sort((a, b) => a.name.localeCompare(b.name) || a.steps - b.steps);
  }

  async schedulerConstants(name, steps) {
    const path = `scheduler-${name}-${steps}.json`;
    if (!this.constants.has(path)) {
      if (!this.schedules().some((s) => s.path === path)) {
        const have = this.schedules().map((s) => `${s.name} ${s.steps}`).join(", ");
        throw new MlcwebError(`This build has no constants for ${name} with ${steps} steps.`, `Pick one of: ${have}; or rebuild with --set steps=...`);
      }
      this.constants.set(path, await this.model.fetchJSON(path));
    }
    return this.constants.get(path);
  }

  /** RGBA bytes of the `vae` output (float32 whole numbers 0..255; WGSL has no uint8). */
  async readImage(tensor) {
    return Uint8ClampedArray.from(await this.model.read(tensor));
  }

  drawImage(pixels) {
    const [h, w] = this.meta.image_shape;
    const canvas = $("canvas");
    canvas.width = w;
    canvas.height = h;
    canvas.getContext("2d").putImageData(new ImageData(pixels, w, h), 0, 0);
  }

  /** Generate one image; returns { pixels: Uint8ClampedArray (H*W*4 RGBA), seconds, stepTimes }. */
  async generate({ prompt = "", negative = "", scheduler = "dpm", steps = 20, guidance = 7.5, seed = 0, latents = null, previewEvery = 0, onStep = () => {} } = {}) {
    checkRequest({ steps, guidance, seed }, this.meta.scheduler_config);
    const m = this.model;
    const tvm = m.tvm;
    const consts = await this.schedulerConstants(scheduler, steps);
    const shape = this.meta.latent_shape;
    const count = shape.reduce((a, b) => a * b, 1);
    const seconds = {};
    tvm.beginScope();
    try {
      let start = performance.now();
      const cond = m.call("clip", m.tensor(this.tokenizer.encode(prompt), [1, MAX_LENGTH], "int32"));
      const uncond = m.call("clip", m.tensor(this.tokenizer.encode(negative), [1, MAX_LENGTH], "int32"));
      const embeddings = m.call("concat_embeddings", uncond, cond);
      await m.sync();
      seconds.clip = (performance.now() - start) / 1000;

      const init = latents ? Float32Array.from(latents) : seededNormal(count, seed).map((x) => x * consts.init_noise_sigma);
      let sample = m.tensor(init, shape, "float32");
      const zeros = m.tensor(new Float32Array(count), shape, "float32");
      const scale = m.tensor(Float32Array.of(guidance), [], "float32");
      let history = [];
      let saved = null;
      start = performance.now();
      const stepTimes = [];
      for (let i = 0; i < consts.timesteps.length; ++i) {
        const stepStart = performance.now();
        const t = m.tensor(Int32Array.of(consts.timesteps[i]), [], "int32");
        const eps = m.call("unet", sample, t, embeddings, scale);
        const coeffs = m.tensor(Float32Array.from(consts.coeffs[i]), [consts.coeffs[i].length], "float32");
        if (consts.scheduler === "dpm") {
          const prev = history.length ? history[history.length - 1] : zeros;
          const out = m.call(consts.function, sample, eps, prev, coeffs);
          history = [out.get(1)];
          sample = out.get(0);
        } else {
          const flags = consts.flags[i];
          const hist = history.slice(-3).reverse();
          while (hist.length < 3) hist.push(zeros);
          const stepSample = flags.use_saved_sample ? saved : sample;
          if (flags.save_sample) saved = sample;
          const out = m.call(consts.function, stepSample, eps, ...hist, coeffs);
          if (flags.push_eps) history = [...history.slice(-3), eps];
          sample = out;
        }
        await m.sync();
        stepTimes.push((performance.now() - stepStart) / 1000);
        if (previewEvery > 0 && (i + 1) % previewEvery === 0 && i + 1 < consts.timesteps.length) {
          this.drawImage(await this.readImage(m.call("vae", sample)));
        }
        onStep(i + 1, consts.timesteps.length, stepTimes[i]);
      }
      seconds["unet+scheduler"] = (performance.now() - start) / 1000;
      seconds["per step"] = seconds["unet+scheduler"] / consts.timesteps.length;
      start = performance.now();
      const pixels = await this.readImage(m.call("vae", sample));
      seconds.vae = (performance.now() - start) / 1000;
      this.drawImage(pixels);
      return { pixels, seconds, stepTimes };
    } finally {
      tvm.endScope();
    }
  }
}

function showTimes(seconds) {
  const body = $("times").querySelector("tbody");
  body.innerHTML = "";
  for (const [stage, s] of Object.entries(seconds)) {
    const row = body.insertRow();
    row.insertCell().textContent = stage;
    const cell = row.insertCell();
    cell.className = "n";
    cell.textContent = s >= 1 ? `${s.toFixed(2)} s` : `${(s * 1000).toFixed(0)} ms`;
  }
}

async function main() {
  const base = new URL("./", window.location.href);
  let gpu;
  try {
    gpu = await checkWebGPU();
  } catch (err) {
    $("gpu").textContent = "";
    showError(err);
    return;
  }
  $("gpu").textContent = `GPU: ${[gpu.info.vendor, gpu.info.architecture, gpu.info.description].filter(Boolean).join(" ") || "WebGPU adapter"}; shader-f16 ${gpu.hasF16 ? "available" : "not available"}.`;
  const loadStart = performance.now();
  let model;
  let tokenizer;
  try {
    model = await loadModel(base, {
      onProgress: ({ loaded, total, cached, text }) => {
        $("weights-bar").max = total;
        $("weights-bar").value = loaded;
        $("weights-text").textContent = `${text}${loaded < total ? (cached ? " · in browser cache" : " · downloading") : ""}`;
      },
      log: (msg) => console.log(msg),
    });
    tokenizer = new ClipTokenizer(await model.fetchJSON("tokenizer/tokenizer.json"));
  } catch (err) {
    showError(err);
    return;
  }
  $("gpu").textContent += ` ${model.info.message}`;
  const sd = new StableDiffusion(model, tokenizer);
  const loadSeconds = (performance.now() - loadStart) / 1000;
  for (const s of sd.schedules()) {
    const option = new Option(`${s.name === "dpm" ? "DPM-Solver++" : "PNDM"}, ${s.steps} steps`, `${s.name}:${s.steps}`);
    option.selected = s.name === "dpm" && s.steps === 20;
    $("scheduler").add(option);
  }

  let busy = false;
  const generate = async (options) => {
    if (busy) throw new MlcwebError("A generation is already running.", "Wait for it to finish.");
    busy = true;
    $("generate").disabled = true;
    document.body.dataset.state = "running";
    $("status").textContent = "generating…";
    try {
      const result = await sd.generate({
        ...options,
        onStep: (done, total, secs) => {
          $("steps-bar").max = total;
          $("steps-bar").value = done;
          $("steps-text").textContent = `step ${done} / ${total} · ${(secs * 1000).toFixed(0)} ms`;
        },
      });
      showTimes({ "load (weights + kernels)": loadSeconds, ...result.seconds });
      $("status").textContent = "done";
      document.body.dataset.state = "done";
      return result;
    } catch (err) {
      showError(err);
      throw err;
    } finally {
      busy = false;
      $("generate").disabled = false;
    }
  };
  $("generate").addEventListener("click", () => {
    const [scheduler, steps] = $("scheduler").value.split(":");
    generate({
      prompt: $("prompt").value,
      negative: $("negative").value,
      scheduler,
      steps: Number(steps),
      guidance: Number($("guidance").value),
      seed: Number($("seed").value),
      previewEvery: $("preview").checked ? Number($("preview-every").value) : 0,
    }).catch(() => {});
  });
  window.mlcwebSD = { generate, tokenizer, model, loadSeconds };
  $("generate").disabled = false;
  document.body.dataset.state = "ready";
}

main();

// Stable Diffusion in the page: CLIP tokenizer -> clip -> UNet + scheduler loop -> VAE -> canvas.
//
// The host loop mirrors mlcweb_stable_diffusion.schedulers.HostLoop and runner.StableDiffusion
// (docs/stable_diffusion.md): each step runs the compiled `unet` (classifier-free guidance inside) or,
// for guidance-free models and scales of 1 or less, the batch-one `unet_single`, then the scheduler's
// step function with that step's coefficients from scheduler-<name>-<steps>.json.
//
// For scripts and tests the page exposes window.mlcwebSD = { ready, generate(options) }; options may
// carry `latents` (a Float32Array) to start from given noise instead of the seeded generator, and
// `noises` (one Float32Array per step that adds noise) for Euler-ancestral and LCM.

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

/** A seeded stream of standard normal samples (mulberry32 + Box-Muller; not torch.randn's stream):
 * `normals(count)` gives the next `count`, so the initial latents and each step's noise come from one seed. */
export function normalStream(seed) {
  let state = seed >>> 0;
  const uniform = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return (count) => {
    const out = new Float32Array(count);
    for (let i = 0; i < count; i += 2) {
      const r = Math.sqrt(-2 * Math.log(1 - uniform()));
      const theta = 2 * Math.PI * uniform();
      out[i] = r * Math.cos(theta);
      if (i + 1 < count) out[i + 1] = r * Math.sin(theta);
    }
    return out;
  };
}

/** The first `count` samples of seed's stream. */
export function seededNormal(count, seed) {
  return normalStream(seed)(count);
}

export const SCHEDULER_TITLES = { dpm: "DPM-Solver++", pndm: "PNDM", euler: "Euler", euler_a: "Euler ancestral", lcm: "LCM" };

// Builds from before the family carry no defaults: SD1.5's.
const SD15_DEFAULTS = { scheduler: "dpm", steps: 20, guidance: 7.5, guidance_free: false };

class StableDiffusion {
  constructor(model, tokenizer, tokenizer2 = null) {
    this.model = model;
    this.tokenizer = tokenizer;
    this.tokenizer2 = tokenizer2; // SDXL's second text encoder's
    this.meta = model.manifest.metadata;
    this.defaults = this.meta.defaults || SD15_DEFAULTS;
    this.constants = new Map();
  }

  /** The prompt's embeddings for unet_single: [hidden states], for SDXL [hidden states, pooled] (runner.text). */
  text(prompt) {
    const m = this.model;
    const ids = (tok) => m.tensor(tok.encode(prompt), [1, MAX_LENGTH], "int32");
    if (!this.tokenizer2) return [m.call("clip", ids(this.tokenizer))];
    const out = m.call("clip", ids(this.tokenizer), ids(this.tokenizer2));
    return [out.get(0), out.get(1)];
  }

  /** Embeddings for the guided unet: negative, then prompt; SDXL guides an empty negative prompt against
   * zeros, as diffusers' SDXL pipelines do with none (runner.encode). */
  guidedText(prompt, negative) {
    const m = this.model;
    const cond = this.text(prompt);
    const zeros = (t) => m.tensor(new Float32Array(t.shape.reduce((a, b) => a * b, 1)), Array.from(t.shape), "float32");
    const uncond = this.tokenizer2 && !negative && this.meta.force_zeros_for_empty_prompt ? cond.map(zeros) : this.text(negative);
    const out = m.call("concat_embeddings", ...uncond.flatMap((u, i) => [u, cond[i]]));
    return cond.length === 1 ? [out] : [out.get(0), out.get(1)];
  }

  /** The step image-to-image starts at (runner.img2img_start), after the same checks. */
  img2imgStart(consts, steps, strength, image) {
    if (!("vae_encode" in this.model.manifest.functions)) {
      throw new MlcwebError("This build has no VAE encoder, so it cannot start from an image.", "Rebuild it with this version of mlcweb.");
    }
    if (!consts.add_noise) throw new MlcwebError(`Image-to-image runs with DPM-Solver++, Euler or Euler ancestral, not ${SCHEDULER_TITLES[consts.scheduler] || consts.scheduler}.`, "Pick another scheduler.");
    if (!Number.isFinite(strength) || strength <= 0 || strength > 1) throw new MlcwebError(`The strength must be a number in (0, 1], not ${strength}.`);
    const kept = Math.min(Math.trunc(steps * strength), steps);
    if (kept < 1) throw new MlcwebError(`A strength of ${strength} with ${steps} steps runs no step.`, "Raise the strength or the steps.");
    const [h, w] = this.meta.image_shape;
    if (image.length !== h * w * 3) throw new MlcwebError(`The start image has ${image.length} values; this build takes ${h}x${w} RGB.`);
    return steps - kept;
  }

  /** The UNet function for a guidance scale, and whether it takes the scale (runner.unet_call). */
  unetCall(guidance) {
    const has = (name) => name in this.model.manifest.functions;
    if (this.meta.guidance_embedding) return { unet: "unet_single", takesScale: true };
    if (has("unet_single") && (guidance <= 1 || !has("unet"))) return { unet: "unet_single", takesScale: false };
    return { unet: "unet", takesScale: true };
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
  async generate({ prompt = "", negative = "", scheduler = this.defaults.scheduler, steps = this.defaults.steps, guidance = this.defaults.guidance, seed = 0, latents = null, noises = null, initImage = null, strength = 0.8, encodeNoises = null, previewEvery = 0, onStep = () => {} } = {}) {
    checkRequest({ steps, guidance, seed }, this.meta.scheduler_config);
    const m = this.model;
    const tvm = m.tvm;
    const consts = await this.schedulerConstants(scheduler, steps);
    const first = initImage ? this.img2imgStart(consts, steps, strength, initImage) : 0;
    const shape = this.meta.latent_shape;
    const count = shape.reduce((a, b) => a * b, 1);
    const { unet, takesScale } = this.unetCall(guidance);
    const scaleValue = unet === "unet" ? Math.max(guidance, 1) : guidance;
    const seconds = {};
    tvm.beginScope();
    try {
      let start = performance.now();
      const embeddings = unet === "unet" ? this.guidedText(prompt, negative) : this.text(prompt);
      await m.sync();
      seconds.clip = (performance.now() - start) / 1000;

      const normals = normalStream(seed);
      const zeros = m.tensor(new Float32Array(count), shape, "float32");
      let sample;
      let modelInput;
      if (initImage) {
        // Image-to-image (runner.encode_image): the encoder's sample drawn first, then add_noise at the
        // start step, a * latents + b * noise, done by ancestral_step with coefficients [0, 0, 0, a, b, scale].
        const [h, w] = this.meta.image_shape;
        const draw = (k) => m.tensor(encodeNoises ? Float32Array.from(encodeNoises[k]) : normals(count), shape, "float32");
        const encoded = m.call("vae_encode", m.tensor(Float32Array.from(initImage), [h, w, 3], "float32"), draw(0));
        const [a, b] = consts.add_noise[first];
        const firstScale = consts.input_scales ? consts.input_scales[first] : 1;
        const coeffs = m.tensor(Float32Array.of(0, 0, 0, a, b, firstScale), [6], "float32");
        const out = m.call("ancestral_step", encoded, zeros, draw(1), coeffs);
        sample = out.get(0);
        modelInput = out.get(1);
      } else {
        const init = latents ? Float32Array.from(latents) : normals(count).map((x) => x * consts.init_noise_sigma);
        sample = m.tensor(init, shape, "float32");
        const inputScale = consts.input_scales ? consts.input_scales[0] : 1;
        modelInput = inputScale === 1 ? sample : m.tensor(init.map((x) => x * inputScale), shape, "float32");
      }
      const scale = takesScale ? [m.tensor(Float32Array.of(scaleValue), [], "float32")] : [];
      let noiseIndex = 0;
      const noise = () => m.tensor(noises ? Float32Array.from(noises[noiseIndex++]) : normals(count), shape, "float32");
      let history = [];
      let saved = null;
      start = performance.now();
      const stepTimes = [];
      const total = consts.timesteps.length - first;
      // One step in flight: step i+1 is encoded while the GPU runs step i (the scheduler's inputs stay on
      // the GPU), and step i is reported once the GPU has finished it.
      let inFlight = null;
      let lastDone = start;
      const finish = async ({ done, index, latest }) => {
        await done;
        const now = performance.now();
        stepTimes.push((now - lastDone) / 1000);
        lastDone = now;
        const count = index + 1 - first;
        if (previewEvery > 0 && count % previewEvery === 0 && count < total) {
          this.drawImage(await this.readImage(m.call("vae", latest)));
        }
        onStep(count, total, stepTimes[stepTimes.length - 1]);
      };
      for (let i = first; i < consts.timesteps.length; ++i) {
        const t = m.tensor(Int32Array.of(consts.timesteps[i]), [], "int32");
        const eps = m.call(unet, modelInput, t, ...embeddings, ...scale);
        // image-to-image's first DPM step has no history: first order there
        const row = i === first && first > 0 && consts.first_order ? consts.first_order[i] : consts.coeffs[i];
        const coeffs = m.tensor(Float32Array.from(row), [row.length], "float32");
        if (consts.function === "ancestral_step") {
          const out = m.call(consts.function, sample, eps, consts.noise[i] ? noise() : zeros, coeffs);
          sample = out.get(0);
          modelInput = out.get(1);
        } else if (consts.function === "dpm_solver_step") {
          const prev = history.length ? history[history.length - 1] : zeros;
          const out = m.call(consts.function, sample, eps, prev, coeffs);
          history = [out.get(1)];
          sample = modelInput = out.get(0);
        } else {
          const flags = consts.flags[i];
          const hist = history.slice(-3).reverse();
          while (hist.length < 3) hist.push(zeros);
          const stepSample = flags.use_saved_sample ? saved : sample;
          if (flags.save_sample) saved = sample;
          const out = m.call(consts.function, stepSample, eps, ...hist, coeffs);
          if (flags.push_eps) history = [...history.slice(-3), eps];
          sample = modelInput = out;
        }
        const step = { done: m.submitted(), index: i, latest: sample };
        if (inFlight) await finish(inFlight);
        inFlight = step;
      }
      if (inFlight) await finish(inFlight);
      seconds["unet+scheduler"] = (performance.now() - start) / 1000;
      seconds["per step"] = seconds["unet+scheduler"] / (consts.timesteps.length - first);
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
  let tokenizer2 = null;
  try {
    model = await loadModel(base, {
      onProgress: ({ loaded, total, cached, text }) => {
        $("weights-bar").max = total;
        $("weights-bar").value = loaded;
        $("weights-text").textContent = `${text}${loaded < total ? (cached ? " · in browser cache" : " · downloading") : ""}`;
      },
      log: (msg) => console.log(msg),
    });
    const meta = model.manifest.metadata;
    tokenizer = new ClipTokenizer(await model.fetchJSON("tokenizer/tokenizer.json"), meta.pad_token_id);
    if (meta.pad_token_2 !== undefined) tokenizer2 = new ClipTokenizer(await model.fetchJSON("tokenizer_2/tokenizer.json"), meta.pad_token_id_2);
  } catch (err) {
    showError(err);
    return;
  }
  $("gpu").textContent += ` ${model.info.message}`;
  if (model.info.matrix) $("gpu").textContent += ` ${model.info.matrixText} run on the adapter's subgroup matrices (tensor cores).`;
  const sd = new StableDiffusion(model, tokenizer, tokenizer2);
  const loadSeconds = (performance.now() - loadStart) / 1000;
  for (const s of sd.schedules()) {
    const option = new Option(`${SCHEDULER_TITLES[s.name] || s.name}, ${s.steps} step${s.steps === 1 ? "" : "s"}`, `${s.name}:${s.steps}`);
    option.selected = s.name === sd.defaults.scheduler && s.steps === sd.defaults.steps;
    $("scheduler").add(option);
  }
  // The model's own defaults; guidance-free models (SD-Turbo) hide the scale and the negative prompt.
  $("guidance").value = String(sd.defaults.guidance);
  $("model").textContent = `${sd.meta.variant || "sd1.5"} · ${sd.meta.image_shape[1]}x${sd.meta.image_shape[0]} · ${sd.meta.prediction_type || "epsilon"} prediction`;
  document.body.dataset.guidanceFree = String(sd.defaults.guidance_free && !sd.meta.guidance_embedding);

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
  // Image-to-image: the chosen picture drawn at the build's size (the browser's resampling), as RGB.
  let initImage = null;
  $("init-image").addEventListener("change", async () => {
    const file = $("init-image").files[0];
    initImage = null;
    if (!file) return;
    try {
      const bitmap = await createImageBitmap(file);
      const [h, w] = sd.meta.image_shape;
      const canvas = new OffscreenCanvas(w, h);
      canvas.getContext("2d").drawImage(bitmap, 0, 0, w, h);
      const rgba = canvas.getContext("2d").getImageData(0, 0, w, h).data;
      initImage = new Float32Array(h * w * 3);
      for (let p = 0; p < h * w; ++p) for (let c = 0; c < 3; ++c) initImage[p * 3 + c] = rgba[p * 4 + c];
    } catch (err) {
      showError(new MlcwebError(`${file.name} is not an image this browser can read.`, "Pick a PNG, JPEG or WebP file."));
    }
  });
  const fromForm = () => {
    const [scheduler, steps] = $("scheduler").value.split(":");
    return {
      initImage,
      strength: Number($("strength").value),
      prompt: $("prompt").value,
      negative: $("negative").value,
      scheduler,
      steps: Number(steps),
      guidance: Number($("guidance").value),
      seed: Number($("seed").value),
      previewEvery: $("preview").checked ? Number($("preview-every").value) : 0,
    };
  };
  $("generate").addEventListener("click", () => generate(fromForm()).catch(() => {}));
  // Live mode: an image each time typing pauses; a pause during a generation runs once it ends.
  $("live").checked = sd.defaults.steps <= 4;
  let timer = null;
  let pending = false;
  const live = () => {
    if (!$("live").checked) return;
    if (busy) {
      pending = true;
      return;
    }
    pending = false;
    generate(fromForm()).catch(() => {}).finally(() => pending && live());
  };
  $("prompt").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(live, 300);
  });
  window.mlcwebSD = { generate, tokenizer, model, loadSeconds };
  $("generate").disabled = false;
  document.body.dataset.state = "ready";
}

main();

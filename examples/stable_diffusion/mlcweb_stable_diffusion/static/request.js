// The checks deploy.py makes on a request (runner.check_request), for the page's form: one plain message
// each, before any GPU work. Kept apart from sd.js so node can test it without a page.
import { MlcwebError } from "./mlcweb.js";

export const MAX_SEED = 2 ** 32 - 1; // sd.js seeds its generator with 32 bits; deploy.py takes the same range
export const MAX_GUIDANCE = 100;

/** The checks deploy.py makes (runner.check_request), as one plain message each. */
export function checkRequest({ steps, guidance, seed }, schedulerConfig = {}) {
  const maxSteps = Math.floor((schedulerConfig.num_train_timesteps || 1000) / 2);
  if (!Number.isInteger(steps) || steps < 1 || steps > maxSteps) {
    throw new MlcwebError(`Steps must be a whole number between 1 and ${maxSteps}, not ${steps}.`);
  }
  if (!Number.isFinite(guidance) || guidance < 0 || guidance > MAX_GUIDANCE) {
    throw new MlcwebError(`The guidance scale must be a number between 0 and ${MAX_GUIDANCE}, not ${guidance}.`);
  }
  if (!Number.isInteger(seed) || seed < 0 || seed > MAX_SEED) {
    throw new MlcwebError(`The seed must be a whole number between 0 and ${MAX_SEED}, not ${seed}.`);
  }
}

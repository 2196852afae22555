"""Schedulers as Relax functions, with their per-step constants computed from diffusers and saved as JSON.

DPM-Solver++ (multistep, second order), PNDM (PLMS), Euler, Euler-ancestral and LCM are all linear in
the tensors they combine (the model output, be it noise or v, the latents, history, fresh noise), so each
becomes a small Relax function that takes those tensors and a vector of per-step coefficients. The
coefficients are computed here, once, from diffusers' own schedulers (their timesteps, sigmas and
alphas, in float32 as they compute them) and saved as JSON, so one compiled function serves every step
and any step count, natively and in the browser. Euler, Euler-ancestral and LCM share one function
(:class:`Ancestral`); where they add noise the host draws it, in the order diffusers' pipelines draw it
from their seeded generator.

Adding a scheduler is a :class:`Scheduler` subclass: its Relax step (``step_function``), its constants
(``constants``), and the bookkeeping of its history (``HostLoop.step``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
)
from tvm import relax

__all__ = ["LCM", "PNDM", "SCHEDULERS", "Ancestral", "DPMSolver", "Euler", "EulerAncestral", "HostLoop", "Scheduler"]


def _coeff(bb: relax.BlockBuilder, coeffs: relax.Var, i: int) -> relax.Expr:
    scalar = relax.op.strided_slice(coeffs, axes=[0], begin=[i], end=[i + 1])
    return bb.emit(relax.op.reshape(scalar, (1, 1, 1, 1)))


class Scheduler:
    """A scheduler: a Relax step function plus per-step constants."""

    name: ClassVar[str]
    function: ClassVar[str]
    history: ClassVar[int]
    num_coeffs: ClassVar[int]

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)

    def diffusers(self) -> Any:
        raise NotImplementedError

    def step_function(self, shape: tuple[int, ...]) -> relax.Function:
        raise NotImplementedError

    def constants(self, num_steps: int) -> dict[str, Any]:
        raise NotImplementedError

    img2img: ClassVar[bool] = True

    def _constants(self, sched: Any, num_steps: int, rows: list[list[float]], **extra: Any) -> dict[str, Any]:
        """The JSON a host loop needs: timesteps, one coefficient row per step, and ``extra``; for
        image-to-image, per step the ``add_noise`` pair ``(a, b)`` that starts there from an encoded image
        (``a * latents + b * noise``, diffusers' ``add_noise`` with its begin index set to that step)."""
        data = {
            "scheduler": self.name,
            "function": self.function,
            "num_steps": num_steps,
            "timesteps": [int(t) for t in sched.timesteps],
            "coeffs": rows,
            "init_noise_sigma": float(sched.init_noise_sigma),
            **extra,
        }
        if self.img2img:
            data["add_noise"] = self._add_noise(num_steps, len(rows))
        return data

    def _add_noise(self, num_steps: int, count: int) -> list[list[float]]:
        """``(a, b)`` for each start step, from one diffusers scheduler with its begin index moved."""
        sched = self.diffusers()
        sched.set_timesteps(num_steps)
        one, zero = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
        pairs = []
        for start in range(count):
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(start)
            t = sched.timesteps[start : start + 1]
            pairs.append([float(sched.add_noise(one, zero, t)), float(sched.add_noise(zero, one, t))])
        return pairs

    def _signature(self, shape: tuple[int, ...]) -> tuple[relax.Var, relax.Var, list[relax.Var], relax.Var]:
        ty = relax.TensorType(shape, "float32")
        sample, eps = relax.Var("sample", ty), relax.Var("eps", ty)
        hist = [relax.Var(f"history{i}", ty) for i in range(self.history)]
        coeffs = relax.Var("coeffs", relax.TensorType((self.num_coeffs,), "float32"))
        return sample, eps, hist, coeffs


class DPMSolver(Scheduler):
    """DPM-Solver++ multistep, second order, midpoint: diffusers' SD default configuration.

    Step: ``x0 = (c5 * sample - c0 * eps) * c1``; ``out = c2 * sample + c3 * x0 + c4 * prev_x0``; returns
    ``(out, x0)``; the host keeps ``x0`` as the next step's ``prev_x0``. With epsilon prediction
    ``c5 = 1``; with v-prediction ``x0 = alpha_t * sample - sigma_t * v`` (``c5 = alpha_t, c1 = 1``).
    """

    name = "dpm"
    function = "dpm_solver_step"
    history = 1
    num_coeffs = 6

    def diffusers(self) -> DPMSolverMultistepScheduler:
        sched = DPMSolverMultistepScheduler.from_config(self.config)
        cfg = sched.config
        wanted = {"algorithm_type": "dpmsolver++", "solver_type": "midpoint"}
        off = {k: cfg[k] for k, v in wanted.items() if cfg[k] != v}
        if cfg.prediction_type not in ("epsilon", "v_prediction"):
            off["prediction_type"] = cfg.prediction_type
        if off or cfg.solver_order > 2 or cfg.use_karras_sigmas or cfg.thresholding:
            raise ValueError(f"DPM-Solver here is second-order dpmsolver++ (midpoint, epsilon or v); config has {off}")
        return sched

    def step_function(self, shape: tuple[int, ...]) -> relax.Function:
        sample, eps, (prev_x0,), coeffs = self._signature(shape)
        bb = relax.BlockBuilder()
        with bb.function(self.function, [sample, eps, prev_x0, coeffs], attrs={"num_input": 4}):
            with bb.dataflow():
                c = [_coeff(bb, coeffs, i) for i in range(self.num_coeffs)]
                scaled = relax.op.multiply(c[5], sample)
                x0 = bb.emit(relax.op.multiply(relax.op.subtract(scaled, relax.op.multiply(c[0], eps)), c[1]))
                out = bb.emit(
                    relax.op.add(
                        relax.op.add(relax.op.multiply(c[2], sample), relax.op.multiply(c[3], x0)),
                        relax.op.multiply(c[4], prev_x0),
                    )
                )
                result = bb.emit_output(relax.Tuple([out, x0]))
            bb.emit_func_output(result)
        return bb.get()[self.function]

    def constants(self, num_steps: int) -> dict[str, Any]:
        sched = self.diffusers()
        sched.set_timesteps(num_steps)
        sigmas = sched.sigmas.to(torch.float32)
        n = len(sched.timesteps)
        rows = []
        first_order: list[list[float]] = []
        lower_order_nums = 0
        cfg = sched.config

        def alpha_sigma(sig: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return sched._sigma_to_alpha_sigma_t(sig)

        for i in range(n):
            lower_final = i == n - 1 and (
                cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
            )
            alpha_s, sigma_s = alpha_sigma(sigmas[i])
            alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
            lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
            lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
            h = lambda_t - lambda_s
            e = alpha_t * (torch.exp(-h) - 1.0)
            a = sigma_t / sigma_s
            first_order.append([float(a), float(-e), 0.0])
            if cfg.solver_order == 1 or lower_order_nums < 1 or lower_final:
                b, c = -e, torch.tensor(0.0)
            else:
                alpha_s1, sigma_s1 = alpha_sigma(sigmas[i - 1])
                lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
                r0 = (lambda_s - lambda_s1) / h
                b, c = -e - 0.5 * e / r0, 0.5 * e / r0
            if cfg.prediction_type == "v_prediction":
                x0_coeffs = [float(sigma_s), 1.0]
                sample_coeff = float(alpha_s)
            else:
                x0_coeffs = [float(sigma_s), float(1.0 / alpha_s)]
                sample_coeff = 1.0
            rows.append([*x0_coeffs, float(a), float(b), float(c), sample_coeff])
            first_order[-1] = [*x0_coeffs, *first_order[-1], sample_coeff]
            lower_order_nums = min(lower_order_nums + 1, cfg.solver_order)
        # image-to-image starts part-way: its first step has no history, so it is first order there
        return self._constants(sched, num_steps, rows, first_order=first_order)


class PNDM(Scheduler):
    """PNDM with PRK steps skipped (PLMS), as SD1.5 ships it.

    Step: ``e = c0 * eps + c1 * h0 + c2 * h1 + c3 * h2``; ``out = c4 * sample - c5 * e``, where ``h0..h2``
    are the last three stored model outputs. Per-step flags tell the host which sample to pass
    (PLMS re-uses the first step's sample on its second step) and whether to store ``eps``. With
    v-prediction diffusers turns the combined output into noise, ``sqrt(a_t) * e + sqrt(1 - a_t) * sample``;
    that is linear too, so it is folded into the coefficients.
    """

    name = "pndm"
    function = "pndm_step"
    img2img = False  # PLMS's warm-up bookkeeping assumes it starts at the first step
    history = 3
    num_coeffs = 6

    def diffusers(self) -> PNDMScheduler:
        return PNDMScheduler.from_config(self.config)

    def step_function(self, shape: tuple[int, ...]) -> relax.Function:
        sample, eps, hist, coeffs = self._signature(shape)
        bb = relax.BlockBuilder()
        with bb.function(self.function, [sample, eps, *hist, coeffs], attrs={"num_input": 6}):
            with bb.dataflow():
                c = [_coeff(bb, coeffs, i) for i in range(self.num_coeffs)]
                e = relax.op.multiply(c[0], eps)
                for k, h in enumerate(hist):
                    e = relax.op.add(e, relax.op.multiply(c[k + 1], h))
                e = bb.emit(e)
                out = bb.emit_output(relax.op.subtract(relax.op.multiply(c[4], sample), relax.op.multiply(c[5], e)))
            bb.emit_func_output(out)
        return bb.get()[self.function]

    def constants(self, num_steps: int) -> dict[str, Any]:
        sched = self.diffusers()
        sched.set_timesteps(num_steps)
        if not sched.config.skip_prk_steps:
            raise ValueError("only PNDM with skip_prk_steps=True (PLMS, as SD1.5 ships it) is supported")
        stride = sched.config.num_train_timesteps // num_steps
        rows, flags = [], []
        stored = 0
        for counter, t in enumerate(int(x) for x in sched.timesteps):
            prev_t = t - stride
            if counter == 1:
                prev_t, t = t, t + stride
            push = counter != 1
            stored_after = min(stored + 1, 4) if push else stored
            if counter == 0:
                w = [1.0, 0.0, 0.0, 0.0]
            elif counter == 1:
                w = [0.5, 0.5, 0.0, 0.0]
            elif stored_after == 2:
                w = [1.5, -0.5, 0.0, 0.0]
            elif stored_after == 3:
                w = [23 / 12, -16 / 12, 5 / 12, 0.0]
            else:
                w = [55 / 24, -59 / 24, 37 / 24, -9 / 24]
            alpha_t = sched.alphas_cumprod[t]
            alpha_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
            beta_t, beta_prev = 1 - alpha_t, 1 - alpha_prev
            sample_coeff = (alpha_prev / alpha_t) ** 0.5
            denom = alpha_t * beta_prev**0.5 + (alpha_t * beta_t * alpha_prev) ** 0.5
            eps_coeff = (alpha_prev - alpha_t) / denom
            if sched.config.prediction_type == "v_prediction":
                w = [x * float(alpha_t**0.5) for x in w]
                sample_coeff = sample_coeff - eps_coeff * beta_t**0.5
            elif sched.config.prediction_type != "epsilon":
                raise ValueError(f"PNDM here predicts epsilon or v; config has {sched.config.prediction_type!r}")
            rows.append([*w, float(sample_coeff), float(eps_coeff)])
            flags.append({"push_eps": push, "save_sample": counter == 0, "use_saved_sample": counter == 1})
            stored = stored_after
        return self._constants(sched, num_steps, rows, flags=flags)


class Ancestral(Scheduler):
    """The one-step family (Euler, Euler-ancestral, LCM): no history, optional fresh noise.

    Step: ``x0 = c0 * sample + c1 * model_output``; ``out = c2 * x0 + c3 * sample + c4 * noise``;
    returns ``(out, c5 * out)``, the second being the next step's UNet input (Euler scales it by
    ``1 / sqrt(sigma^2 + 1)``). ``input_scales[i]`` is that scale at step ``i`` (the first step's input is
    scaled by the host); per-step ``noise`` flags
    say when the host draws fresh noise (a standard normal of the latents' shape) for ``noise``.
    """

    function = "ancestral_step"
    history = 0
    num_coeffs = 6

    def step_function(self, shape: tuple[int, ...]) -> relax.Function:
        sample, eps, _, coeffs = self._signature(shape)
        noise = relax.Var("noise", relax.TensorType(shape, "float32"))
        bb = relax.BlockBuilder()
        with bb.function(self.function, [sample, eps, noise, coeffs], attrs={"num_input": 4}):
            with bb.dataflow():
                c = [_coeff(bb, coeffs, i) for i in range(self.num_coeffs)]
                x0 = bb.emit(relax.op.add(relax.op.multiply(c[0], sample), relax.op.multiply(c[1], eps)))
                out = relax.op.add(relax.op.multiply(c[2], x0), relax.op.multiply(c[3], sample))
                out = bb.emit(relax.op.add(out, relax.op.multiply(c[4], noise)))
                result = bb.emit_output(relax.Tuple([out, relax.op.multiply(c[5], out)]))
            bb.emit_func_output(result)
        return bb.get()[self.function]

    def _prediction(self, sched: Any) -> str:
        kind = str(sched.config.prediction_type)
        if kind not in ("epsilon", "v_prediction"):
            raise ValueError(f"{self.name} here predicts epsilon or v; config has {kind!r}")
        return kind


class EulerAncestral(Ancestral):
    """Euler-ancestral (diffusers' ``EulerAncestralDiscreteScheduler``; SD-Turbo's sampler, trailing
    timesteps): ``prev = sample + (sample - x0) / sigma * (sigma_down - sigma) + sigma_up * noise``."""

    name = "euler_a"
    ancestral: ClassVar[bool] = True

    def diffusers(self) -> Any:
        sched = EulerAncestralDiscreteScheduler.from_config(self.config)
        if sched.config.rescale_betas_zero_snr:
            raise ValueError("Euler here does not rescale betas to zero terminal SNR")
        return sched

    def constants(self, num_steps: int) -> dict[str, Any]:
        sched = self.diffusers()
        sched.set_timesteps(num_steps)
        kind = self._prediction(sched)
        timesteps = [float(t) for t in sched.timesteps]
        if any(t != round(t) for t in timesteps):
            raise ValueError(
                f"{sched.config.timestep_spacing!r} spacing gives fractional timesteps for {num_steps} steps; "
                "the compiled UNet takes whole timesteps (use 'leading' or 'trailing')"
            )
        sigmas = sched.sigmas.to(torch.float32)
        scales = [float(1.0 / (sig**2 + 1) ** 0.5) for sig in sigmas[:-1]]
        rows, noise = [], []
        for i in range(len(timesteps)):
            sigma, sigma_to = sigmas[i], sigmas[i + 1]
            if kind == "epsilon":
                x0 = [1.0, float(-sigma)]
            else:
                x0 = [float(1.0 / (sigma**2 + 1)), float(-sigma / (sigma**2 + 1) ** 0.5)]
            if self.ancestral:
                sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
                sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
            else:
                sigma_up, sigma_down = torch.tensor(0.0), sigma_to
            ratio = (sigma_down - sigma) / sigma  # prev = sample + (sample - x0) * ratio
            rows.append(
                [*x0, float(-ratio), float(1.0 + ratio), float(sigma_up), scales[i + 1] if i + 1 < len(scales) else 1.0]
            )
            noise.append(bool(self.ancestral))
        return self._constants(sched, num_steps, rows, input_scales=scales, noise=noise)


class Euler(EulerAncestral):
    """Euler (diffusers' ``EulerDiscreteScheduler`` without churn): Euler-ancestral with no noise."""

    name = "euler"
    ancestral: ClassVar[bool] = False

    def diffusers(self) -> Any:
        sched = EulerDiscreteScheduler.from_config(self.config)
        cfg = sched.config
        if cfg.use_karras_sigmas or cfg.get("use_exponential_sigmas") or cfg.get("use_beta_sigmas"):
            raise ValueError("Euler here uses the schedule's own sigmas (no Karras, exponential or beta sigmas)")
        if cfg.interpolation_type != "linear" or cfg.rescale_betas_zero_snr or cfg.final_sigmas_type != "zero":
            raise ValueError("Euler here interpolates sigmas linearly and ends at sigma 0")
        return sched


class LCM(Ancestral):
    """LCM (diffusers' ``LCMScheduler``): ``denoised = c_out * x0 + c_skip * sample``, then noised again
    to the next timestep (``sqrt(a_prev) * denoised + sqrt(1 - a_prev) * noise``) except on the last step,
    whose output is ``denoised``."""

    name = "lcm"
    img2img = False  # diffusers' LCM img2img pipeline picks its timesteps from the strength: not this path

    def diffusers(self) -> LCMScheduler:
        sched = LCMScheduler.from_config(self.config)
        if sched.config.thresholding or sched.config.clip_sample or sched.config.rescale_betas_zero_snr:
            raise ValueError("LCM here runs without thresholding, clipping or zero-SNR betas")
        return sched

    def constants(self, num_steps: int) -> dict[str, Any]:
        sched = self.diffusers()
        sched.set_timesteps(num_steps)
        kind = self._prediction(sched)
        timesteps = [int(t) for t in sched.timesteps]
        rows, noise = [], []
        for i, t in enumerate(timesteps):
            last = i == len(timesteps) - 1
            prev_t = t if last else timesteps[i + 1]
            alpha = sched.alphas_cumprod[t]
            alpha_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
            c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
            if kind == "epsilon":
                x0 = [float(1.0 / alpha.sqrt()), float(-(1 - alpha).sqrt() / alpha.sqrt())]
            else:
                x0 = [float(alpha.sqrt()), float(-(1 - alpha).sqrt())]
            keep = 1.0 if last else float(alpha_prev.sqrt())
            fresh = 0.0 if last else float((1 - alpha_prev).sqrt())
            rows.append([*x0, float(keep * c_out), float(keep * c_skip), fresh, 1.0])
            noise.append(not last)
        return self._constants(sched, num_steps, rows, input_scales=[1.0] * len(rows), noise=noise)


SCHEDULERS: dict[str, type[Scheduler]] = {
    "dpm": DPMSolver,
    "pndm": PNDM,
    "euler": Euler,
    "euler_a": EulerAncestral,
    "lcm": LCM,
}
SCHEDULER_TITLES = {
    "dpm": "DPM-Solver++",
    "pndm": "PNDM",
    "euler": "Euler",
    "euler_a": "Euler ancestral",
    "lcm": "LCM",
}


def step_functions() -> dict[str, type[Scheduler]]:
    """One scheduler class per compiled step function (Euler, Euler-ancestral and LCM share one)."""
    return {cls.function: cls for cls in reversed(SCHEDULERS.values())}


@dataclass
class HostLoop:
    """The host side of a scheduler: feeds the step function and keeps its history.

    ``call(function_name, *args)`` runs a compiled function (native VM or anything with that shape);
    ``noise()`` gives a fresh standard-normal tensor of the latents' shape on the device, drawn only on
    the steps that use one (the order diffusers draws from its generator).
    """

    constants: dict[str, Any]
    zeros: np.ndarray

    def __post_init__(self) -> None:
        self.history: list[Any] = []  # DPM: [prev_x0]; PNDM: stored eps, newest last
        self.saved_sample: Any = None

    start: int = 0  # image-to-image: the step the schedule starts at

    def first_input(self, latents: np.ndarray) -> np.ndarray:
        """The first step's UNet input from the initial latents (Euler scales it)."""
        scales = self.constants.get("input_scales")
        scale = float(scales[self.start]) if scales else 1.0
        return latents if scale == 1.0 else (latents * np.float32(scale)).astype(np.float32)

    def step(self, call: Any, index: int, sample: Any, eps: Any, to_device: Any, noise: Any = None) -> tuple[Any, Any]:
        """``(next sample, next UNet input)``: the same tensor except for the one-step family."""
        row = self.constants["coeffs"][index]
        if index == self.start and self.start and "first_order" in self.constants:
            row = self.constants["first_order"][index]
        coeffs = to_device(np.asarray(row, dtype=np.float32))
        function = self.constants["function"]
        if function == "ancestral_step":
            fresh = noise() if self.constants["noise"][index] else to_device(self.zeros)
            out, model_input = call(function, sample, eps, fresh, coeffs)
            return out, model_input
        if function == "dpm_solver_step":
            prev = self.history[-1] if self.history else to_device(self.zeros)
            out, x0 = call(function, sample, eps, prev, coeffs)
            self.history = [x0]
            return out, out
        flags = self.constants["flags"][index]
        hist = list(reversed(self.history[-3:]))
        hist += [to_device(self.zeros)] * (3 - len(hist))
        step_sample = self.saved_sample if flags["use_saved_sample"] else sample
        if flags["save_sample"]:
            self.saved_sample = sample
        out = call(function, step_sample, eps, *hist, coeffs)
        if flags["push_eps"]:
            self.history = [*self.history[-3:], eps]
        return out, out

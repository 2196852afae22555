"""Schedulers as Relax functions, with their per-step constants computed from diffusers and saved as JSON.

Both DPM-Solver++ (multistep, second order) and PNDM (PLMS) are linear in the tensors they combine, so
each becomes one small Relax function that takes the latents, the guided noise prediction, the history
tensors it needs and a vector of per-step coefficients. The coefficients are computed here, once, with
the same formulas and the same float32 arithmetic as diffusers' ``DPMSolverMultistepScheduler`` and
``PNDMScheduler``, and saved as JSON, so one compiled function serves every step and any step count,
natively and in the browser.

Adding a scheduler is a :class:`Scheduler` subclass: its Relax step (``step_function``), its constants
(``constants``), and the bookkeeping of its history (``HostLoop.step``). Euler, for example, is
``x + (sigma_next - sigma) * eps`` with one coefficient per step and no history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, PNDMScheduler
from tvm import relax

__all__ = ["PNDM", "SCHEDULERS", "DPMSolver", "HostLoop", "Scheduler"]


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

    def _constants(self, sched: Any, num_steps: int, rows: list[list[float]], **extra: Any) -> dict[str, Any]:
        """The JSON a host loop needs: timesteps, one coefficient row per step, and ``extra``."""
        return {
            "scheduler": self.name,
            "function": self.function,
            "num_steps": num_steps,
            "timesteps": [int(t) for t in sched.timesteps],
            "coeffs": rows,
            "init_noise_sigma": float(sched.init_noise_sigma),
            **extra,
        }

    def _signature(self, shape: tuple[int, ...]) -> tuple[relax.Var, relax.Var, list[relax.Var], relax.Var]:
        ty = relax.TensorType(shape, "float32")
        sample, eps = relax.Var("sample", ty), relax.Var("eps", ty)
        hist = [relax.Var(f"history{i}", ty) for i in range(self.history)]
        coeffs = relax.Var("coeffs", relax.TensorType((self.num_coeffs,), "float32"))
        return sample, eps, hist, coeffs


class DPMSolver(Scheduler):
    """DPM-Solver++ multistep, second order, midpoint: diffusers' SD default configuration.

    Step: ``x0 = (sample - c0 * eps) * c1``; ``out = c2 * sample + c3 * x0 + c4 * prev_x0``; returns
    ``(out, x0)``; the host keeps ``x0`` as the next step's ``prev_x0``.
    """

    name = "dpm"
    function = "dpm_solver_step"
    history = 1
    num_coeffs = 5

    def diffusers(self) -> DPMSolverMultistepScheduler:
        sched = DPMSolverMultistepScheduler.from_config(self.config)
        cfg = sched.config
        wanted = {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "prediction_type": "epsilon"}
        off = {k: cfg[k] for k, v in wanted.items() if cfg[k] != v}
        if off or cfg.solver_order > 2 or cfg.use_karras_sigmas or cfg.thresholding:
            raise ValueError(f"DPM-Solver here is second-order dpmsolver++ (midpoint, epsilon); config has {off}")
        return sched

    def step_function(self, shape: tuple[int, ...]) -> relax.Function:
        sample, eps, (prev_x0,), coeffs = self._signature(shape)
        bb = relax.BlockBuilder()
        with bb.function(self.function, [sample, eps, prev_x0, coeffs], attrs={"num_input": 4}):
            with bb.dataflow():
                c = [_coeff(bb, coeffs, i) for i in range(self.num_coeffs)]
                x0 = bb.emit(relax.op.multiply(relax.op.subtract(sample, relax.op.multiply(c[0], eps)), c[1]))
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
            if cfg.solver_order == 1 or lower_order_nums < 1 or lower_final:
                b, c = -e, torch.tensor(0.0)
            else:
                alpha_s1, sigma_s1 = alpha_sigma(sigmas[i - 1])
                lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
                r0 = (lambda_s - lambda_s1) / h
                b, c = -e - 0.5 * e / r0, 0.5 * e / r0
            rows.append([float(sigma_s), float(1.0 / alpha_s), float(a), float(b), float(c)])
            lower_order_nums = min(lower_order_nums + 1, cfg.solver_order)
        return self._constants(sched, num_steps, rows)


class PNDM(Scheduler):
    """PNDM with PRK steps skipped (PLMS), as SD1.5 ships it.

    Step: ``e = c0 * eps + c1 * h0 + c2 * h1 + c3 * h2``; ``out = c4 * sample - c5 * e``, where ``h0..h2``
    are the last three stored noise predictions. Per-step flags tell the host which sample to pass
    (PLMS re-uses the first step's sample on its second step) and whether to store ``eps``.
    """

    name = "pndm"
    function = "pndm_step"
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
            rows.append([*w, float(sample_coeff), float((alpha_prev - alpha_t) / denom)])
            flags.append({"push_eps": push, "save_sample": counter == 0, "use_saved_sample": counter == 1})
            stored = stored_after
        return self._constants(sched, num_steps, rows, flags=flags)


SCHEDULERS: dict[str, type[Scheduler]] = {"dpm": DPMSolver, "pndm": PNDM}


@dataclass
class HostLoop:
    """The host side of a scheduler: feeds the step function and keeps its history.

    ``call(function_name, *args)`` runs a compiled function (native VM or anything with that shape).
    """

    constants: dict[str, Any]
    zeros: np.ndarray

    def __post_init__(self) -> None:
        self.history: list[Any] = []  # DPM: [prev_x0]; PNDM: stored eps, newest last
        self.saved_sample: Any = None

    def step(self, call: Any, index: int, sample: Any, eps: Any, to_device: Any) -> Any:
        coeffs = to_device(np.asarray(self.constants["coeffs"][index], dtype=np.float32))
        if self.constants["scheduler"] == "dpm":
            prev = self.history[-1] if self.history else to_device(self.zeros)
            out, x0 = call(self.constants["function"], sample, eps, prev, coeffs)
            self.history = [x0]
            return out
        flags = self.constants["flags"][index]
        hist = list(reversed(self.history[-3:]))
        hist += [to_device(self.zeros)] * (3 - len(hist))
        step_sample = self.saved_sample if flags["use_saved_sample"] else sample
        if flags["save_sample"]:
            self.saved_sample = sample
        out = call(self.constants["function"], step_sample, eps, *hist, coeffs)
        if flags["push_eps"]:
            self.history = [*self.history[-3:], eps]
        return out

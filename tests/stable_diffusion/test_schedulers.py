"""Each scheduler's Relax step, compiled on llvm, against diffusers' step on the same tensors."""

import numpy as np
import pytest
import torch
import tvm
from mlcweb_stable_diffusion.schedulers import SCHEDULERS, HostLoop
from mlcweb_stable_diffusion.variants import LCM_SCHEDULER, SD15_SCHEDULER, SD21_SCHEDULER, TURBO_SCHEDULER
from tvm import relax

import mlcweb_passes as mp

SHAPE = (1, 4, 8, 8)


def _compile(function: relax.Function) -> relax.VirtualMachine:
    mod = tvm.IRModule({function.attrs["global_symbol"]: function})
    exe = tvm.compile(mod, "llvm", relax_pipeline=mp.pipeline("llvm"))
    return relax.VirtualMachine(exe, tvm.cpu())


CASES = [
    ("dpm", 10, SD15_SCHEDULER),
    ("dpm", 20, SD15_SCHEDULER),
    ("pndm", 10, SD15_SCHEDULER),
    ("pndm", 20, SD15_SCHEDULER),
    ("dpm", 20, SD21_SCHEDULER),  # v-prediction
    ("pndm", 20, SD21_SCHEDULER),
    ("euler_a", 1, TURBO_SCHEDULER),  # SD-Turbo: trailing, one step from t=999
    ("euler_a", 4, TURBO_SCHEDULER),
    ("euler_a", 30, SD15_SCHEDULER),  # leading spacing
    ("euler_a", 10, SD21_SCHEDULER),
    ("euler", 4, TURBO_SCHEDULER),
    ("euler", 10, SD21_SCHEDULER),
    ("lcm", 4, LCM_SCHEDULER),
    ("lcm", 1, LCM_SCHEDULER),
    ("lcm", 4, {**LCM_SCHEDULER, "prediction_type": "v_prediction"}),
]


@pytest.mark.parametrize(
    ("name", "steps", "config"),
    CASES,
    ids=[f"{n}-{s}-{c['prediction_type']}-{c['timestep_spacing']}" for n, s, c in CASES],
)
def test_every_step_matches_diffusers(name: str, steps: int, config: dict[str, object]) -> None:
    """Each step's output, and for Euler the next UNet input (scale_model_input), within 1e-5 of
    diffusers on the same tensors; schedulers that add noise draw it from a generator seeded as
    diffusers' is, on the same steps."""
    scheduler = SCHEDULERS[name](config)
    vm = _compile(scheduler.step_function(SHAPE))
    consts = scheduler.constants(steps)
    reference = scheduler.diffusers()
    reference.set_timesteps(steps)
    assert [int(t) for t in reference.timesteps] == consts["timesteps"]

    rng = np.random.default_rng(0)
    sample = (rng.standard_normal(SHAPE) * float(reference.init_noise_sigma)).astype(np.float32)
    theirs_gen, ours_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    loop = HostLoop(consts, np.zeros(SHAPE, np.float32))
    ours = tvm.runtime.tensor(sample)
    model_input = loop.first_input(sample)
    expected_input = reference.scale_model_input(torch.from_numpy(sample), reference.timesteps[0]).numpy()
    np.testing.assert_allclose(model_input, expected_input, rtol=1e-6, atol=1e-6)
    worst = 0.0
    for i, t in enumerate(reference.timesteps):
        eps = rng.standard_normal(SHAPE).astype(np.float32)
        kwargs = {"generator": theirs_gen} if name in ("euler_a", "lcm") else {}
        expected = reference.step(torch.from_numpy(eps), t, torch.from_numpy(sample), **kwargs).prev_sample

        def noise() -> tvm.runtime.Tensor:
            return tvm.runtime.tensor(torch.randn(SHAPE, generator=ours_gen).numpy())

        ours, model_input = loop.step(
            lambda f, *a: vm[f](*a), i, ours, tvm.runtime.tensor(eps), tvm.runtime.tensor, noise
        )
        got = ours.numpy()
        scale = max(1.0, float(np.abs(expected).max()))
        worst = max(worst, float(np.abs(got - expected.numpy()).max()) / scale)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5 * scale, err_msg=f"step {i}")
        if i + 1 < len(reference.timesteps):
            want = reference.scale_model_input(expected, reference.timesteps[i + 1]).numpy()
            np.testing.assert_allclose(model_input.numpy(), want, rtol=1e-5, atol=1e-5 * scale)
        sample = expected.numpy()
    assert worst < 1e-5


def test_unknown_dpm_variant_is_refused() -> None:
    config = {**SD15_SCHEDULER, "algorithm_type": "sde-dpmsolver++"}
    with pytest.raises(ValueError, match="second-order dpmsolver"):
        SCHEDULERS["dpm"](config).constants(10)

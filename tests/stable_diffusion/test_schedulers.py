"""Each scheduler's Relax step, compiled on llvm, against diffusers' step on the same tensors."""

import numpy as np
import pytest
import torch
import tvm
from mlcweb_stable_diffusion.models import SD15_SCHEDULER_CONFIG
from mlcweb_stable_diffusion.schedulers import SCHEDULERS, HostLoop
from tvm import relax

import mlcweb_passes as mp

SHAPE = (1, 4, 8, 8)


def _compile(function: relax.Function) -> relax.VirtualMachine:
    mod = tvm.IRModule({function.attrs["global_symbol"]: function})
    exe = tvm.compile(mod, "llvm", relax_pipeline=mp.pipeline("llvm"))
    return relax.VirtualMachine(exe, tvm.cpu())


@pytest.mark.parametrize(("name", "steps"), [("dpm", 10), ("dpm", 20), ("pndm", 10), ("pndm", 20)])
def test_every_step_matches_diffusers(name: str, steps: int) -> None:
    scheduler = SCHEDULERS[name](SD15_SCHEDULER_CONFIG)
    vm = _compile(scheduler.step_function(SHAPE))
    consts = scheduler.constants(steps)
    reference = scheduler.diffusers()
    reference.set_timesteps(steps)
    assert [int(t) for t in reference.timesteps] == consts["timesteps"]

    rng = np.random.default_rng(0)
    sample = rng.standard_normal(SHAPE).astype(np.float32)
    ours = tvm.runtime.tensor(sample)
    loop = HostLoop(consts, np.zeros(SHAPE, np.float32))
    worst = 0.0
    for i, t in enumerate(reference.timesteps):
        eps = rng.standard_normal(SHAPE).astype(np.float32)
        expected = reference.step(torch.from_numpy(eps), t, torch.from_numpy(sample)).prev_sample.numpy()
        ours = loop.step(lambda f, *a: vm[f](*a), i, ours, tvm.runtime.tensor(eps), tvm.runtime.tensor)
        got = ours.numpy()
        scale = max(1.0, float(np.abs(expected).max()))
        worst = max(worst, float(np.abs(got - expected).max()) / scale)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale, err_msg=f"step {i}")
        sample = expected
    assert worst < 1e-5


def test_unknown_dpm_variant_is_refused() -> None:
    config = {**SD15_SCHEDULER_CONFIG, "algorithm_type": "sde-dpmsolver++"}
    with pytest.raises(ValueError, match="second-order dpmsolver"):
        SCHEDULERS["dpm"](config).constants(10)

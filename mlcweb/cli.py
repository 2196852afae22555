"""The ``mlcweb`` command line: list, build, tune, run, serve."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .choices import DTYPES, ENCODINGS, TARGET_NAMES, WEBGPU_ATTENTION
from .errors import MlcwebError

if TYPE_CHECKING:
    from .model import BuildOptions

__all__ = ["build_and_report", "check_output_file", "main", "run_command"]

log = logging.getLogger("mlcweb")


def _parse_set(values: Sequence[str]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise MlcwebError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            config[key] = json.loads(raw)
        except json.JSONDecodeError:
            config[key] = raw
    return config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlcweb", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every stage (DEBUG logging)")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="models from installed plugins")

    b = sub.add_parser("build", help="compile a model into an artifact directory")
    b.add_argument("model", help="model name (see `mlcweb list`)")
    b.add_argument("--target", default="llvm", help=f"one of {', '.join(TARGET_NAMES)} (default llvm)")
    b.add_argument("--out", type=Path, help="output directory (default dist/<model>-<target>)")
    b.add_argument(
        "--model", dest="model_path", type=Path, help="local model folder (default: the plugin's tiny model)"
    )
    b.add_argument("--dtype", choices=DTYPES, default="float32")
    b.add_argument("--db", type=Path, help="MetaSchedule database directory to apply (default: the shipped one)")
    b.add_argument("--no-db", action="store_true", help="apply no database: default schedules everywhere")
    b.add_argument("--arch", help="GPU architecture for cuda (default sm_90)")
    b.add_argument("--no-cuda-graph", action="store_true", help="cuda: launch kernels one by one, no CUDA graph")
    b.add_argument(
        "--subgroup-size",
        type=int,
        default=32,
        help="webgpu: also build a library with subgroup reductions for adapters whose subgroups are this "
        "wide (32, NVIDIA and Apple GPUs, the default and the one size TVM builds for; 0: none)",
    )
    b.add_argument(
        "--no-matrix",
        action="store_true",
        help="webgpu float16: write no subgroup-matrix (tensor core) kernels beside the portable ones",
    )
    b.add_argument(
        "--attention",
        choices=WEBGPU_ATTENTION,
        default="matrix",
        help="webgpu float16: the flash attentions' kernel beside the portable one, installed with the "
        "subgroup-matrix GEMMs: matrix (subgroup matrices, the default), portable (none: TVM's kernel "
        "everywhere), lanes (WGSL on the lanes; slower on the GPUs measured)",
    )
    b.add_argument(
        "--conv-layout",
        choices=["auto", "NCHW", "NHWC"],
        default="auto",
        help="layout of 2-D convolutions (default auto: NHWC for cuda float16, NCHW elsewhere)",
    )
    b.add_argument("--weight-encoding", choices=ENCODINGS, default="raw", help="f32-to-bf16 halves float32 weights")
    b.add_argument("--no-cache", action="store_true", help="re-import instead of using the import cache")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a plugin config value")
    b.add_argument(
        "--plan-memory",
        action="store_true",
        help="print each function's weights and planned memory, the largest buffer and the peak, and stop "
        "(no weights computed, no kernels compiled, nothing written)",
    )

    t = sub.add_parser("tune", help="tune a model's kernels with MetaSchedule into a database")
    t.add_argument("model", help="model name (see `mlcweb list`)")
    t.add_argument("--target", default="llvm", help=f"one of {', '.join(TARGET_NAMES)} (default llvm)")
    t.add_argument("--db", type=Path, required=True, help="database directory (created, or resumed and merged)")
    t.add_argument("--trials", type=int, default=64, help="valid measured schedules per task (default 64)")
    t.add_argument("--tasks", metavar="PATTERN", help="only tasks matching these globs (comma-separated)")
    t.add_argument("--max-tasks", type=int, help="only the N heaviest tasks (runs per use x FLOPs)")
    t.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on the RPC servers of this tracker")
    t.add_argument("--rpc-key", help="the key the RPC servers registered under")
    t.add_argument("--builders", type=int, help="parallel build processes (default: CPU count)")
    t.add_argument(
        "--search",
        choices=["evolutionary", "replay-trace"],
        default="evolutionary",
        help="evolutionary: cost-model guided (default); replay-trace: random samples, cheap per trial",
    )
    t.add_argument("--model", dest="model_path", type=Path, help="local model folder")
    t.add_argument("--dtype", choices=DTYPES, default="float32")
    t.add_argument("--arch", help="GPU architecture for cuda (default sm_90)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a plugin config value")

    r = sub.add_parser("run", help="run a built function natively")
    r.add_argument("artifacts", type=Path)
    r.add_argument("--function", default=None, help="function to call (default: the first)")
    r.add_argument("--inputs", type=Path, help=".npz with one array per input, by name (default: random)")
    r.add_argument("--output", type=Path, help="write the outputs to this .npz")
    r.add_argument("--device", help="override the device (cpu, cuda)")
    r.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("cache", help="list or clear the import cache (MLCWEB_CACHE_DIR, ~/.cache/mlcweb)")
    c.add_argument("action", choices=["list", "clear"])
    c.add_argument("--keep", type=int, default=0, help="clear: keep the N most recently used imports")

    s = sub.add_parser("serve", help="serve an artifact directory or web bundle on 127.0.0.1")
    s.add_argument("directory", type=Path)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    return parser


def _cmd_list() -> int:
    from .plugins import PluginHost

    host = PluginHost()
    if not host.models:
        print("no models: install a plugin package, e.g. pip install -e examples/stable_diffusion")
        return 0
    for name, reg in sorted(host.models.items()):
        print(f"{name:<24} {reg.spec.description}  [plugin {reg.plugin}; components {', '.join(reg.spec.components)}]")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from .model import BuildOptions

    options = BuildOptions(
        target=args.target,
        out=args.out or Path("dist") / f"{args.model}-{args.target}",
        model_path=args.model_path,
        dtype=args.dtype,
        database=args.db,
        weight_encoding=args.weight_encoding,
        use_cache=not args.no_cache,
        config=_parse_set(args.set),
        arch=args.arch,
        use_shipped_database=not args.no_db,
        cuda_graph=not args.no_cuda_graph,
        conv_layout=args.conv_layout,
        webgpu_subgroup_size=args.subgroup_size,
        webgpu_matrix=not args.no_matrix,
        webgpu_attention=args.attention,
    )
    if args.db is not None and args.no_db:
        raise MlcwebError("--db and --no-db contradict each other; pass one")
    return build_and_report(args.model, options, plan_only=args.plan_memory)


def build_and_report(model: str, options: BuildOptions, *, plan_only: bool = False) -> int:
    """Build ``model`` with the installed plugins and print the build's summary (what ``mlcweb build``
    does once its arguments are parsed; run it under :func:`run_command` for the CLI's error handling);
    with ``plan_only``, print its memory plan instead (:func:`~mlcweb.build.plan_memory`)."""
    from .build import build, plan_memory
    from .plugins import PluginHost

    if plan_only:
        print(plan_memory(PluginHost(), model, options).summary())
        return 0
    result = build(PluginHost(), model, options, progress=sys.stderr.isatty())
    print(result.summary())
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from .model import BuildOptions
    from .plugins import PluginHost
    from .tune import TuneOptions, summary_table, tune

    build = BuildOptions(
        target=args.target,
        out=args.db,
        model_path=args.model_path,
        dtype=args.dtype,
        config=_parse_set(args.set),
        arch=args.arch,
    )
    options = TuneOptions(
        build=build,
        db=args.db,
        trials=args.trials,
        tasks=args.tasks,
        rpc_tracker=args.rpc_tracker,
        rpc_key=args.rpc_key,
        builders=args.builders,
        search=args.search,
        max_tasks=args.max_tasks,
    )
    results = tune(PluginHost(), args.model, options)
    print(summary_table(results))
    return 130 if any(r.status == "interrupted" for r in results) else 0


def _random_input(spec: dict[str, Any], rng: Any) -> Any:
    """Random values for an input: integers inside its declared range (0..99 without one)."""
    if spec["dtype"].startswith(("int", "uint")):
        low, high = spec.get("range", [0, 99])
        return rng.integers(low, high + 1, size=spec["shape"]).astype(spec["dtype"])
    return rng.standard_normal(spec["shape"]).astype(spec["dtype"])


def _load_inputs(path: Path, specs: list[dict[str, Any]]) -> list[Any]:
    """The named arrays of an .npz file, one per input; one-line errors for a bad file."""
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [s["name"] for s in specs if s["name"] not in data]
            if missing:
                raise MlcwebError(f"{path} lacks inputs {missing}; it has {list(data.keys())}")
            return [data[s["name"]] for s in specs]
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise MlcwebError(f"{path} is not a readable .npz of numeric arrays ({err}); save it with numpy.savez") from err


def check_output_file(path: Path, example: str) -> None:
    """That ``--output`` can be written, before any work: not a folder, and its folder exists (it is
    created) and is writable. ``example``: a file name to suggest when ``path`` is a folder."""
    if path.is_dir():
        raise MlcwebError(f"--output {path} is a folder; pass a file name such as {path / example}")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MlcwebError(f"cannot write --output {path}: cannot create its folder ({err.strerror})") from err
    if not os.access(parent, os.W_OK):
        raise MlcwebError(f"cannot write --output {path}: its folder is not writable")


def _cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from .runtime import load, outputs_to_numpy

    if args.output:
        check_output_file(args.output, "outputs.npz")  # before the work, not after
    arts = load(args.artifacts, args.device)
    func = args.function or arts.functions[0]
    if func not in arts.functions:
        raise MlcwebError(f"--function {func!r} is not in {args.artifacts}; it has {', '.join(arts.functions)}")
    specs = arts.input_specs(func)
    if args.inputs:
        inputs = _load_inputs(args.inputs, specs)
    else:
        rng = np.random.default_rng(args.seed)
        inputs = [_random_input(s, rng) for s in specs]
    start = time.perf_counter()
    outputs = outputs_to_numpy(arts(func, *inputs))
    elapsed = time.perf_counter() - start
    for name, array in outputs.items():
        print(f"{name}: {array.dtype}{list(array.shape)} mean {float(array.mean()):.6g} std {float(array.std()):.6g}")
    print(f"{func} ran in {elapsed * 1000:.1f} ms on {arts.device}")
    if args.output:
        tmp = args.output.with_name(f".{args.output.name}.tmp.npz")
        cast(Any, np.savez)(tmp, **outputs)
        tmp.replace(args.output)
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from .import_cache import ImportCache

    cache = ImportCache()
    if args.action == "list":
        entries = cache.entries()
        for key, size, used in entries:
            print(f"{key}  {size / 2**20:9.1f} MiB  last used {time.strftime('%Y-%m-%d %H:%M', time.localtime(used))}")
        print(f"{len(entries)} imports, {sum(e[1] for e in entries) / 2**20:.1f} MiB in {cache.root}")
        return 0
    if args.keep < 0:
        raise MlcwebError(f"--keep must be 0 or more, not {args.keep}")
    freed = cache.clear(args.keep)
    print(f"freed {freed / 2**20:.1f} MiB in {cache.root}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serve import is_loopback, make_server

    if not 0 <= args.port <= 65535:
        raise MlcwebError(f"--port must be between 0 and 65535, not {args.port}")
    if not is_loopback(args.host):
        print(
            f"mlcweb: warning: --host {args.host} serves {args.directory} to other machines on the network; "
            "use 127.0.0.1 unless that is what you want",
            file=sys.stderr,
        )
    try:
        server = make_server(args.directory, args.host, args.port)
    except FileNotFoundError as err:  # an OSError too, but about the folder, not the port
        raise MlcwebError(str(err)) from err
    except OSError as err:
        raise MlcwebError(f"cannot listen on {args.host}:{args.port} ({err.strerror}); pick another --port") from err
    print(f"serving {args.directory} at http://{args.host}:{server.server_address[1]}/ (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def run_command(command: Callable[[], int], *, verbose: bool = False) -> int:
    """Run ``command`` as the CLI runs its commands: logging at WARNING (DEBUG with ``verbose``), and an
    error the user can fix printed as one line with exit code 2."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return command()
    except (MlcwebError, FileNotFoundError) as err:
        if verbose:
            log.exception("error")
        print(f"mlcweb: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlcweb: interrupted; existing output was left as it was", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands: dict[str, Callable[[], int]] = {
        "list": _cmd_list,
        "build": lambda: _cmd_build(args),
        "tune": lambda: _cmd_tune(args),
        "run": lambda: _cmd_run(args),
        "cache": lambda: _cmd_cache(args),
        "serve": lambda: _cmd_serve(args),
    }
    return run_command(commands[args.command], verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())

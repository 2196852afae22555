"""TVM's web runtime compiled to wasm objects, and the emcc link of a model library with it.

The apache-tvm wheel ships the web runtime's sources (``tvm/web/emcc``, ``tvm/src``, ``tvm/include``) but
not the compiled objects that ``tvm.contrib.tvmjs.create_tvmjs_wasm`` links, nor a few headers those
sources include. This module:

1. stages a source root from installed packages: the ``apache-tvm`` wheel, the ``apache-tvm-ffi`` wheel
   (as ``3rdparty/tvm-ffi``), the ``tvm/support`` stream headers from the ``apache-tvm-tirx`` wheel
   (downloaded once from PyPI with ``pip download``), and the project's own stand-ins in
   ``web/runtime/`` for what no registry ships;
2. leaves out the RPC transport (endpoint, channel, event server, RPC module): a page that runs a model
   does not serve RPC, and those sources need TVM headers no package ships; ``web/runtime/rpc_module.cc``
   keeps the one function of it that other runtime code refers to, as a clear error;
3. compiles ``wasm_runtime.cc``, ``tvmjs_support.cc`` and ``webgpu_runtime.cc`` with emcc into wasm
   object files, cached under ``<cache>/wasm-runtime/<key>`` where the key covers the package versions,
   the emcc version and the stand-in headers, so a machine compiles them once (about 2 minutes);
4. links a model's objects with them (:func:`link_wasm`), passed to ``export_library`` as ``fcompile``.

TVM's LLVM emits bitcode newer than Debian's emscripten (LLVM 14) reads, so :func:`link_wasm` asks
``export_library`` for wasm object files (``object_format = "o"``), which any wasm-ld links.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import MlcwebError, TargetUnavailableError
from .source_tree import web_dir

__all__ = ["LINK_OPT_ENV", "RUNTIME_OBJECTS", "emcc_path", "ensure_runtime", "link_opt", "link_wasm", "runtime_key"]

log = logging.getLogger(__name__)

RUNTIME_OBJECTS = ("wasm_runtime.o", "tvmjs_support.o", "webgpu_runtime.o")
TIRX_WHEEL = "apache-tvm-tirx==0.1.0a4"
# Headers of TVM's src/support and include/tvm/support that the runtime sources include.
_TIRX_HEADERS = ("bytes_io.h", "io.h", "serializer.h")
# RPC transport sources that wasm_runtime.cc includes; staged as empty files (see the module docstring),
# except rpc_module.cc, replaced by web/runtime/rpc_module.cc (one function tvmjs_support.cc refers to).
_RPC_LEFT_OUT = ("rpc_channel.cc", "rpc_endpoint.cc", "rpc_event_impl.cc")
_CFLAGS = ("-O3", "-std=c++17", "-Wno-ignored-attributes")
_LINK_FLAGS = (
    "--no-entry",
    "-s",
    "WASM_BIGINT=1",
    "-s",
    "ERROR_ON_UNDEFINED_SYMBOLS=0",
    "-s",
    "STANDALONE_WASM=1",
    "-s",
    "ALLOW_MEMORY_GROWTH=1",
    "-s",
    "TOTAL_MEMORY=160MB",
)


def emcc_path() -> str:
    """The emcc on PATH; a clear error naming the fix when there is none."""
    emcc = shutil.which("emcc")
    if emcc is None:
        raise TargetUnavailableError(
            "building for 'webgpu' links the model into a wasm with emscripten, and emcc is not on PATH; "
            "install it (apt-get install emscripten) or build for llvm / cuda"
        )
    return emcc


def _emcc_env() -> dict[str, str]:
    env = dict(os.environ)
    # Debian's emscripten needs its JS dependencies (acorn) from the system node path.
    if Path("/usr/share/nodejs").is_dir():
        env["NODE_PATH"] = os.pathsep.join(p for p in (env.get("NODE_PATH"), "/usr/share/nodejs") if p)
    return env


def _emcc_version() -> str:
    out = subprocess.run([emcc_path(), "--version"], capture_output=True, text=True, env=_emcc_env(), check=True)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def _package_dir(name: str) -> Path:
    module = importlib.import_module(name)
    if module.__file__ is None:
        raise TargetUnavailableError(f"cannot locate the installed {name} package's files")
    return Path(module.__file__).resolve().parent


def _stand_ins() -> list[Path]:
    root = web_dir() / "runtime"
    return sorted([root / "builtin_fp16.h", root / "rpc_module.cc", *(root / "support").glob("*.h")])


def runtime_key() -> str:
    """Cache key of the runtime objects: package versions, emcc version, stand-in headers."""
    digest = hashlib.sha256()
    parts: dict[str, Any] = {
        "apache-tvm": importlib.metadata.version("apache-tvm"),
        "apache-tvm-ffi": importlib.metadata.version("apache-tvm-ffi"),
        "tirx": TIRX_WHEEL,
        "emcc": _emcc_version(),
        "cflags": _CFLAGS,
        "left_out": _RPC_LEFT_OUT,
    }
    digest.update(json.dumps(parts, sort_keys=True).encode())
    for path in _stand_ins():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _tirx_headers(cache: Path) -> Path:
    """The ``tvm/support`` headers of the apache-tvm-tirx wheel, downloaded once into ``cache``."""
    dest = cache / "tirx-headers"
    if all((dest / h).is_file() for h in _TIRX_HEADERS):
        return dest
    with tempfile.TemporaryDirectory(prefix="mlcweb-tirx-") as tmp:
        log.info("downloading %s from PyPI for the tvm/support headers", TIRX_WHEEL)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, TIRX_WHEEL],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise TargetUnavailableError(
                f"could not download {TIRX_WHEEL} from PyPI (needed once for TVM's tvm/support headers to "
                f"build the web runtime): {proc.stderr.strip()[-400:]}"
            )
        staged = Path(tmp) / "headers"
        staged.mkdir()
        with zipfile.ZipFile(wheels[0]) as whl:
            for header in _TIRX_HEADERS:
                staged.joinpath(header).write_bytes(whl.read(f"tvm_tirx/include/tvm/support/{header}"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(str(staged), dest)
    return dest


def _stage_sources(root: Path, cache: Path) -> None:
    """Lay out the source tree TVM's web/emcc files expect, from installed packages and stand-ins."""
    tvm_dir, ffi_dir, ours = _package_dir("tvm"), _package_dir("tvm_ffi"), web_dir() / "runtime"
    shutil.copytree(tvm_dir / "src", root / "src")
    shutil.copytree(tvm_dir / "include", root / "include")
    shutil.copytree(tvm_dir / "web" / "emcc", root / "web" / "emcc", ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("include", "src", "3rdparty"):
        shutil.copytree(ffi_dir / part, root / "3rdparty" / "tvm-ffi" / part)
    support_src, support_inc = root / "src" / "support", root / "include" / "tvm" / "support"
    (support_inc / "cuda").mkdir(parents=True)
    support_src.mkdir(parents=True)
    for header in _tirx_headers(cache).iterdir():
        shutil.copy(header, support_inc / header.name)
        shutil.copy(header, support_src / header.name)
    shutil.copy(ours / "support" / "nvtx.h", support_inc / "cuda" / "nvtx.h")
    shutil.copy(ours / "support" / "base64.h", support_src / "base64.h")
    shutil.copy(ours / "support" / "utils.h", support_src / "utils.h")
    (root / "3rdparty" / "compiler-rt").mkdir(parents=True)
    shutil.copy(ours / "builtin_fp16.h", root / "3rdparty" / "compiler-rt" / "builtin_fp16.h")
    shutil.copy(ours / "rpc_module.cc", root / "src" / "runtime" / "rpc" / "rpc_module.cc")
    for name in _RPC_LEFT_OUT:
        (root / "src" / "runtime" / "rpc" / name).write_text(
            "// Left out of mlcweb's browser runtime: RPC transport (see mlcweb/wasm_runtime.py).\n"
        )


def _compile(root: Path, source: str, output: Path) -> None:
    include = [
        f"-I{root}",
        f"-I{root / 'include'}",
        f"-I{root / '3rdparty' / 'tvm-ffi' / 'include'}",
        f"-I{root / '3rdparty' / 'tvm-ffi' / '3rdparty' / 'dlpack' / 'include'}",
        f"-I{root / '3rdparty' / 'compiler-rt'}",
    ]
    cmd = [emcc_path(), *include, *_CFLAGS, "-c", "-o", str(output), str(root / "web" / "emcc" / source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_emcc_env())
    if proc.returncode != 0:
        raise TargetUnavailableError(f"emcc failed to compile TVM's {source}:\n{proc.stderr[-3000:]}")


def ensure_runtime(cache_dir: Path | None = None) -> Path:
    """The folder holding :data:`RUNTIME_OBJECTS` for the installed TVM, compiling them on first use."""
    from .import_cache import default_cache_dir

    cache = (cache_dir or default_cache_dir()) / "wasm-runtime"
    out = cache / runtime_key()
    if all((out / name).is_file() for name in RUNTIME_OBJECTS):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    log.info("compiling TVM's web runtime with emcc into %s (once per machine, about 2 minutes)", out)
    with tempfile.TemporaryDirectory(prefix="tmp-", dir=cache) as tmp:
        root, objects = Path(tmp) / "root", Path(tmp) / "objects"
        objects.mkdir()
        _stage_sources(root, cache)
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(RUNTIME_OBJECTS)) as pool:
            jobs = [pool.submit(_compile, root, n.replace(".o", ".cc"), objects / n) for n in RUNTIME_OBJECTS]
            for job in jobs:
                job.result()
        shutil.rmtree(out, ignore_errors=True)
        os.replace(objects, out)
    return out


LINK_OPT_ENV = "MLCWEB_WASM_LINK_OPT"
LINK_OPTS = ("-O0", "-O1", "-O2", "-O3", "-Os", "-Oz")


def link_opt() -> str:
    """emcc's optimisation level for the link: ``-O3`` (what builds ship: binaryen shrinks the wasm by
    about 40%, at about a minute a library), or ``$MLCWEB_WASM_LINK_OPT`` (the test suite links with
    ``-O1``, about a second: the same code, a larger file)."""
    level = os.environ.get(LINK_OPT_ENV, "-O3")
    if level not in LINK_OPTS:
        raise MlcwebError(
            f"{LINK_OPT_ENV}={level!r} is not an emcc optimisation level: "
            f"use one of {', '.join(LINK_OPTS)}, or unset it"
        )
    return level


def link_wasm(output: str, objects: Sequence[str] | str, options: Sequence[str] | None = None) -> None:
    """``fcompile`` for ``export_library``: link a model's wasm objects with the web runtime (at
    :func:`link_opt`'s level)."""
    runtime = ensure_runtime()
    objs = [objects] if isinstance(objects, str) else list(objects)
    cmd = [emcc_path(), link_opt(), *_LINK_FLAGS, "-o", output, *(str(runtime / n) for n in RUNTIME_OBJECTS), *objs]
    cmd += list(options or [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_emcc_env())
    if proc.returncode != 0:
        raise TargetUnavailableError(f"emcc failed to link {output}:\n{proc.stderr[-3000:]}")


link_wasm.object_format = "o"  # type: ignore[attr-defined]

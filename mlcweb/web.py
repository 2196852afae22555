"""The browser side of a webgpu build: where the web sources live and what the host adds to a bundle.

A webgpu build folder is a static site. Next to the model library (``<model>-webgpu.wasm``), the tensor
cache and the manifest, the host writes the JS every page needs:

- ``tvmjs.bundle.js``: TVM's JS runtime, npm ``@mlc-ai/web-runtime`` (matches TVM 0.27);
- ``tokenizers.mjs``: npm ``@huggingface/tokenizers`` (pure JS);
- ``mlcweb.js``: ours (``web/lib/mlcweb.js``): WebGPU checks, weight download into the Cache API with
  sha256 checks against the manifest, progress, and the TVM runtime set-up.

The plugin writes its page (``index.html`` and its script, shipped in its own package) with the
``mlcweb_write_assets`` hook. The npm
packages are installed into ``web/node_modules`` from ``web/package.json`` (``npm ci``, run by the
Makefile).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import TargetUnavailableError
from .source_tree import web_dir
from .wasm_runtime import emcc_path

__all__ = ["check_web_toolchain", "web_dir", "write_web_runtime"]

# bundle file name -> path under web/
WEB_RUNTIME_FILES = {
    "tvmjs.bundle.js": "node_modules/@mlc-ai/web-runtime/lib/index.js",
    "tokenizers.mjs": "node_modules/@huggingface/tokenizers/dist/tokenizers.mjs",
    "mlcweb.js": "lib/mlcweb.js",
}


def check_web_toolchain() -> None:
    """Fail fast, before any compiling, when a webgpu build could not finish; the error says the fix."""
    emcc_path()
    root = web_dir()
    missing = [rel for rel in WEB_RUNTIME_FILES.values() if not (root / rel).is_file()]
    if missing:
        raise TargetUnavailableError(
            f"building for 'webgpu' ships JS packages that are not installed ({', '.join(missing)} under "
            f"{root}); run `npm ci` in {root} (make install does)"
        )


def write_web_runtime(out_dir: Path) -> list[str]:
    """Copy the host's JS files into a webgpu bundle; returns their names relative to ``out_dir``."""
    check_web_toolchain()
    root = web_dir()
    for name, rel in WEB_RUNTIME_FILES.items():
        shutil.copyfile(root / rel, out_dir / name)
    return sorted(WEB_RUNTIME_FILES)

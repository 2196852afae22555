"""A tiny GPT-2 (boolean cumsum and causal mask) built for WebGPU runs in node on Dawn (SwiftShader on
the CPU) through mlcweb.js, and its logits match transformers on the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import torch

from mlcweb import BuildOptions
from mlcweb.build import build
from mlcweb.plugins import PluginHost
from mlcweb.serve import make_server
from mlcweb.source_tree import web_dir
from mlcweb.wgsl_check import SWIFTSHADER

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
RUN = """
import fs from "node:fs";
const { create, globals } = await import(process.argv[2] + "/index.js");
Object.assign(globalThis, globals);
globalThis.navigator = { gpu: create([]) };
globalThis.tvmjs = (await import("node:module")).createRequire(import.meta.url)(process.argv[3]);
const { loadModel } = await import(process.argv[4]);
const model = await loadModel(process.argv[5]);
model.tvm.beginScope();
const ids = Int32Array.from(JSON.parse(process.argv[6]));
const logits = await model.read(model.call("main", model.tensor(ids, [1, ids.length], "int32")));
model.tvm.endScope();
console.log(JSON.stringify(Array.from(logits)));
process.exit(0);
"""


def test_tiny_gpt2_runs_on_webgpu_and_matches_transformers(tmp_path: Path) -> None:
    sys.path.insert(0, str(PLUGINS))
    import tiny_gpt2_plugin

    host = PluginHost([("tiny_gpt2", tiny_gpt2_plugin)], entry_points=False)
    out = tmp_path / "gpt2-webgpu"
    # checks every shader; the portable library only (SwiftShader's subgroups are 4 wide)
    build(host, "tiny-gpt2", BuildOptions(target="webgpu", out=out, webgpu_subgroup_size=0), progress=False)
    server = make_server(out, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ids = [int(x) for x in np.random.default_rng(1).integers(0, 128, size=16)]
    try:
        (tmp_path / "run.mjs").write_text(RUN)
        env = {**os.environ, "VK_ICD_FILENAMES": str(SWIFTSHADER), "LD_LIBRARY_PATH": str(SWIFTSHADER.parent)}
        args = [
            str(web_dir() / "node_modules" / "webgpu"),
            str(out / "tvmjs.bundle.js"),
            str(out / "mlcweb.js"),
            f"http://127.0.0.1:{server.server_address[1]}/",
            json.dumps(ids),
        ]
        done = subprocess.run(["node", str(tmp_path / "run.mjs"), *args], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        got = np.array(json.loads(done.stdout.strip().splitlines()[-1]), dtype=np.float32)
    finally:
        server.shutdown()
        server.server_close()
    model = tiny_gpt2_plugin.reference_model(dict(tiny_gpt2_plugin.DEFAULT_CONFIG))
    want = model(torch.tensor([ids], dtype=torch.int32)).detach().numpy().reshape(-1)
    # float32 on SwiftShader (its exp and tanh differ from the CPU's in the last bits): about 1e-4 of logits near 0.1
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=5e-4)

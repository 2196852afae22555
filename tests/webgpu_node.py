"""Run a compiled Relax module on WebGPU in node: Dawn (npm ``webgpu``) on SwiftShader, TVM's JS runtime,
the wasm ``mlcweb build`` would link. The numeric checks of the webgpu kernel family use it to compare a
kernel's output with numpy on the CPU (SwiftShader has no shader-f16 here: float32 only)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from mlcweb.source_tree import web_dir
from mlcweb.wasm_runtime import link_wasm
from mlcweb.wgsl_check import SWIFTSHADER

WEBGPU = tvm.target.Target(
    {"kind": "webgpu", "max_shared_memory_per_block": 32768},
    host={"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"},
)

RUN = """
import fs from "node:fs";
const [dawn, tvmjsPath, dir, page] = process.argv.slice(2);
const { create, globals } = await import(dawn + "/index.js");
Object.assign(globalThis, globals);
globalThis.navigator = { gpu: create([]) };
const tvmjs = (await import("node:module")).createRequire(import.meta.url)(tvmjsPath);
const spec = JSON.parse(fs.readFileSync(dir + "/spec.json", "utf8"));
const adapter = await navigator.gpu.requestAdapter();
const features = ["subgroups", "shader-f16"].filter((f) => adapter.features.has(f));
const device = await adapter.requestDevice({ requiredFeatures: features,
  requiredLimits: { maxComputeWorkgroupStorageSize: 32768, maxComputeInvocationsPerWorkgroup: 256 } });
const wasm = new Uint8Array(fs.readFileSync(dir + "/lib.wasm"));
const tvm = await tvmjs.instantiate(wasm, tvmjs.createPolyfillWASI(), () => {});
tvm.initWebGPU(device);
if (fs.existsSync(dir + "/matrix.json")) {
  const { installMatrixKernels } = await import(page);
  installMatrixKernels(tvm.lib.webGPUContext, JSON.parse(fs.readFileSync(dir + "/matrix.json", "utf8")));
}
if (spec.sharePasses) {
  const { streamCommands } = await import(page);
  streamCommands(tvm.lib.webGPUContext, 2, { sharePasses: true });
}
let bindings = null;
if (spec.cacheBindings) {
  const { cacheBindings } = await import(page);
  bindings = cacheBindings(tvm.lib.webGPUContext);
}
const gpu = tvm.webgpu();
tvm.beginScope();
const vm = tvm.createVirtualMachine(gpu);
await tvm.asyncLoadWebGPUPipelines(vm.getInternalModule());
const args = spec.inputs.map((t, i) => {
  const cpu = tvm.empty(t.shape, t.dtype, tvm.cpu());
  cpu.copyFromRawBytes(new Uint8Array(fs.readFileSync(`${dir}/in${i}.bin`)));
  const dev = tvm.empty(t.shape, t.dtype, gpu);
  dev.copyFrom(cpu);
  return dev;
});
if (spec.cacheBindings) {  // a first call fills the caches; the second reuses the uniforms it can
  vm.getFunction(spec.func)(...args);
  await gpu.sync();
}
const out = vm.getFunction(spec.func)(...args);
const cpu = tvm.empty(out.shape, out.dtype, tvm.cpu());
cpu.copyFrom(out);
await gpu.sync();
fs.writeFileSync(dir + "/out.bin", cpu.toRawBytes());
fs.writeFileSync(dir + "/out.json", JSON.stringify({ shape: out.shape, dtype: out.dtype, bindings }));
tvm.endScope();
process.exit(0);
"""


LAVAPIPE = Path("/usr/share/vulkan/icd.d/lvp_icd.json")  # Mesa's CPU Vulkan driver: shader-f16 (Mesa 25)


def run_on_webgpu(
    exe: tvm.runtime.Executable,
    func: str,
    inputs: list[np.ndarray],
    *,
    icd: Path = SWIFTSHADER,
    matrix: dict[str, Any] | None = None,
    share_passes: bool = False,
    cache_bindings: bool = False,
) -> np.ndarray:
    """``func`` of ``exe`` (compiled for :data:`WEBGPU`) on ``inputs``, run in node on the Vulkan driver
    ``icd`` (SwiftShader; :data:`LAVAPIPE` for float16), with ``matrix``'s shaders installed in place of
    the library's (mlcweb.js ``installMatrixKernels``, as the page does) when given; with
    ``share_passes``, commands streamed every 2 dispatches through one compute pass (mlcweb.js
    ``streamCommands(ctx, 2, { sharePasses: true })``); with ``cache_bindings``, ``func`` called twice with
    mlcweb.js ``cacheBindings`` (each dispatch's arguments in a cached uniform buffer, asserted) and the
    second call's output returned. (Bind groups are reused only where a dispatch's buffers repeat, as in a
    model's repeated steps: ``benchmarks/sd_webgpu.py run --cache-bindings`` checks outputs that way.)"""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        exe.export_library(str(d / "lib.wasm"), fcompile=link_wasm)
        if matrix is not None:
            (d / "matrix.json").write_text(json.dumps(matrix))
        specs = []
        for i, a in enumerate(inputs):
            (d / f"in{i}.bin").write_bytes(np.ascontiguousarray(a).tobytes())
            specs.append({"shape": list(a.shape), "dtype": str(a.dtype)})
        spec = {"func": func, "inputs": specs, "sharePasses": share_passes, "cacheBindings": cache_bindings}
        (d / "spec.json").write_text(json.dumps(spec))
        (d / "run.mjs").write_text(RUN)
        modules = web_dir() / "node_modules"
        tvmjs = modules / "@mlc-ai" / "web-runtime" / "lib" / "index.js"
        env = {**os.environ, "VK_ICD_FILENAMES": str(icd), "XDG_RUNTIME_DIR": tmp}
        if icd == SWIFTSHADER:
            env["LD_LIBRARY_PATH"] = str(SWIFTSHADER.parent)
        page = web_dir() / "lib" / "mlcweb.js"
        cmd = ["node", str(d / "run.mjs"), str(modules / "webgpu"), str(tvmjs), str(d), str(page)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        meta = json.loads((d / "out.json").read_text())
        assert not cache_bindings or (meta["bindings"]["groups"] > 0 and meta["bindings"]["uniforms"] > 0), meta
        return np.frombuffer((d / "out.bin").read_bytes(), dtype=meta["dtype"]).reshape(meta["shape"])

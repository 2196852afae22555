"""The page's own checks, run in node: its form refuses what deploy.py refuses, and every JSON file it
reads is checked against the manifest's sha256."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import mlcweb_stable_diffusion
import pytest

from mlcweb.serve import make_server
from mlcweb.source_tree import web_dir

STATIC = Path(mlcweb_stable_diffusion.__file__).parent / "static"


def _node(root: Path, script: str) -> str:
    (root / "run.mjs").write_text(script)
    done = subprocess.run(["node", "run.mjs"], cwd=root, capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture
def page(tmp_path: Path) -> Path:
    shutil.copy(STATIC / "request.js", tmp_path / "request.js")
    shutil.copy(web_dir() / "lib" / "mlcweb.js", tmp_path / "mlcweb.js")
    return tmp_path


CASES = [
    ({"steps": 20, "guidance": 7.5, "seed": 0}, ""),
    ({"steps": 0, "guidance": 7.5, "seed": 0}, "Steps must be a whole number between 1 and 500"),
    ({"steps": 999, "guidance": 7.5, "seed": 0}, "Steps must be"),
    ({"steps": 20, "guidance": "NaN", "seed": 0}, "guidance scale must be a number between 0 and 100"),
    ({"steps": 20, "guidance": "Infinity", "seed": 0}, "guidance scale"),
    ({"steps": 20, "guidance": 7.5, "seed": 2**64}, "seed must be a whole number between 0 and 4294967295"),
    ({"steps": 20, "guidance": 7.5, "seed": -1}, "seed must be"),
]


@pytest.mark.parametrize(("request_", "message"), CASES)
def test_the_form_refuses_what_deploy_refuses(page: Path, request_: dict[str, object], message: str) -> None:
    values = ", ".join(f"{k}: {v}" for k, v in request_.items())
    out = _node(
        page,
        'import { checkRequest } from "./request.js";\n'
        f"try {{ checkRequest({{ {values} }}, {{ num_train_timesteps: 1000 }}); console.log('ok'); }}\n"
        "catch (err) { console.log(`${err.name}: ${err.message}`); }\n",
    )
    assert out == "ok" if not message else out.startswith("MlcwebError") and message in out


@pytest.mark.parametrize(
    ("request_", "message"), [(r, m) for r, m in CASES if r["guidance"] not in ("NaN", "Infinity")]
)
def test_deploy_refuses_the_same(request_: dict[str, int], message: str) -> None:
    from mlcweb_stable_diffusion.runner import check_request

    from mlcweb.errors import MlcwebError

    args = ("a prompt", "", request_["steps"], float(request_["guidance"]), request_["seed"], 1000)
    if not message:
        check_request(*args)
        return
    with pytest.raises(MlcwebError, match=r"--(steps|seed) must be between"):
        check_request(*args)


@pytest.mark.parametrize(
    ("guidance", "prompt"), [(float("nan"), "a prompt"), (float("inf"), "a prompt"), (7.5, "bad \udcff byte")]
)
def test_deploy_refuses_non_finite_guidance_and_non_utf8_prompts(guidance: float, prompt: str) -> None:
    from mlcweb_stable_diffusion.runner import check_request

    from mlcweb.errors import MlcwebError

    with pytest.raises(MlcwebError, match=r"--guidance must be a number|not valid UTF-8"):
        check_request(prompt, "", 20, guidance, 0, 1000)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    site = tmp_path / "site"
    site.mkdir()
    server = make_server(site, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", site
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("corrupt", [False, True])
def test_json_files_are_checked_against_the_manifest(page: Path, served: tuple[str, Path], corrupt: bool) -> None:
    base, site = served
    good = json.dumps({"records": []}).encode()
    manifest = {"files": [{"path": "tensor-cache.json", "size": len(good), "sha256": hashlib.sha256(good).hexdigest()}]}
    (site / "tensor-cache.json").write_bytes(b'{"records": [1]}' if corrupt else good)
    out = _node(
        page,
        'import { Model } from "./mlcweb.js";\n'
        f"const model = new Model(null, null, null, {json.dumps(manifest)}, {{}}, {json.dumps(base)});\n"
        "try { console.log(JSON.stringify(await model.fetchJSON('tensor-cache.json'))); }\n"
        "catch (err) { console.log(`${err.name}: ${err.message}`); }\n",
    )
    if corrupt:
        assert out.startswith("MlcwebError: tensor-cache.json does not match the sha256 in manifest.json")
    else:
        assert json.loads(out) == {"records": []}


def test_the_page_asks_for_the_largest_planned_block_not_only_weights(page: Path) -> None:
    manifest = {"memory": {"unet": {"planned_bytes": 900, "largest_block_bytes": 600}}}
    cache = {"records": [{"records": [{"nbytes": 100}, {"nbytes": 400}]}]}
    out = _node(
        page,
        'import { largestBuffer } from "./mlcweb.js";\n'
        f"console.log(largestBuffer({json.dumps(manifest)}, {json.dumps(cache)}));\n",
    )
    assert out == "600"


ADAPTER = """
const limits = { maxStorageBufferBindingSize: 2 ** 30, maxBufferSize: 2 ** 30, maxStorageBuffersPerShaderStage: 10,
  maxComputeWorkgroupStorageSize: %d, maxComputeInvocationsPerWorkgroup: 256 };
const asked = [];
const adapter = { limits, features: new Set(), info: {},
  requestDevice: async (descriptor) => { asked.push(descriptor); return {}; } };
globalThis.navigator = { gpu: { requestAdapter: async () => adapter } };
"""


@pytest.mark.parametrize(("adapter_bytes", "message"), [(32768, ""), (16384, "at most 16.0 KiB of workgroup memory")])
def test_the_page_asks_for_the_workgroup_memory_the_build_needs(page: Path, adapter_bytes: int, message: str) -> None:
    """The manifest's ``webgpu`` needs become the device's limits, or one plain error when the adapter
    has less (instead of a pipeline error once the kernels are created)."""
    manifest = {"webgpu": {"workgroup_storage_bytes": 24576, "invocations_per_workgroup": 128}}
    out = _node(
        page,
        'import { checkWebGPU, requestDevice, workgroupNeeds } from "./mlcweb.js";\n'
        + ADAPTER % adapter_bytes
        + f"const needs = workgroupNeeds({json.dumps(manifest)});\n"
        "try {\n"
        "  const gpu = await checkWebGPU({ maxBufferBytes: 2 ** 20, ...needs });\n"
        "  await requestDevice(gpu.adapter, 2 ** 20, needs);\n"
        "  const l = asked[0].requiredLimits;\n"
        "  console.log(`ok ${l.maxComputeWorkgroupStorageSize} ${l.maxComputeInvocationsPerWorkgroup}`);\n"
        "} catch (err) { console.log(`${err.name}: ${err.message}`); }\n",
    )
    assert out == "ok 24576 256" if not message else out.startswith("MlcwebError") and message in out


@pytest.mark.parametrize(
    ("features", "sizes", "library"),
    [
        (["subgroups"], (32, 32), "m-webgpu-subgroups.wasm"),  # NVIDIA, Apple
        (["subgroups"], (4, 4), "m-webgpu.wasm"),  # SwiftShader
        (["subgroups"], (32, 64), "m-webgpu.wasm"),  # AMD: 32 or 64 wide, so not known to be 32
        ([], (32, 32), "m-webgpu.wasm"),  # no subgroups feature
    ],
)
def test_the_page_loads_the_subgroup_library_only_where_subgroups_fit_it(
    page: Path, features: list[str], sizes: tuple[int, int], library: str
) -> None:
    manifest = {
        "library": "m-webgpu.wasm",
        "webgpu": {"workgroup_storage_bytes": 8192, "invocations_per_workgroup": 256},
        "subgroups": {
            "library": "m-webgpu-subgroups.wasm",
            "subgroup_size": 32,
            "webgpu": {"workgroup_storage_bytes": 4096, "invocations_per_workgroup": 256},
        },
    }
    adapter = (
        f"{{ features: new Set({json.dumps(features)}), limits: {{ maxComputeWorkgroupStorageSize: 32768 }}, "
        f"info: {{ subgroupMinSize: {sizes[0]}, subgroupMaxSize: {sizes[1]} }} }}"
    )
    out = _node(
        page,
        'import { chooseLibrary } from "./mlcweb.js";\n'
        f"const c = chooseLibrary({json.dumps(manifest)}, {adapter});\n"
        "console.log(`${c.library} ${c.subgroups} ${c.needs.workgroupBytes}`);\n",
    )
    assert out == (f"{library} 32 4096" if "subgroups" in library else f"{library} 0 8192")


MATRIX = {"componentType": "f16", "resultComponentType": "f32", "M": 16, "N": 16, "K": 16, "subgroup_size": 32}
F16_16 = {"componentType": "f16", "resultComponentType": "f32", "M": 16, "N": 16, "K": 16}
BOTH = ["subgroups", "chromium-experimental-subgroup-matrix"]


@pytest.mark.parametrize(
    ("features", "configs", "sizes", "storage", "used"),
    [
        (["subgroups", "chromium-experimental-subgroup-matrix"], [F16_16], (32, 32), 32768, True),
        (["subgroups"], [F16_16], (32, 32), 32768, False),  # no subgroup-matrix feature (Chrome without the flag)
        (
            ["subgroups", "chromium-experimental-subgroup-matrix"],
            [{**F16_16, "componentType": "i8"}],
            (32, 32),
            32768,
            False,
        ),
        (
            ["subgroups", "chromium-experimental-subgroup-matrix"],
            [{**F16_16, "M": 8, "N": 8, "K": 8}],
            (32, 32),
            32768,
            False,
        ),
        (["subgroups", "chromium-experimental-subgroup-matrix"], [F16_16], (32, 64), 32768, False),  # not 32 wide
        (["subgroups", "chromium-experimental-subgroup-matrix"], [F16_16], (32, 32), 16384, False),  # 28 KiB needed
    ],
)
def test_the_page_runs_matrix_kernels_only_where_the_adapter_offers_their_configuration(
    page: Path, features: list[str], configs: list[dict[str, object]], sizes: tuple[int, int], storage: int, used: bool
) -> None:
    """chooseMatrix: the library's subgroup-matrix kernels where the adapter has the feature, their float16
    -> float32 configuration, 32-wide subgroups and the workgroup memory they declare; the device request
    then asks for the feature and the larger workgroup memory."""
    matrix = {"kernels": "m-webgpu-matrix.json", "count": 3, "config": MATRIX, "workgroup_storage_bytes": 28672}
    manifest = {"library": "m-webgpu.wasm", "webgpu": {"workgroup_storage_bytes": 8192, "matrix": matrix}}
    adapter = (
        f"{{ features: new Set({json.dumps(features)}), limits: {{ maxComputeWorkgroupStorageSize: {storage},"
        " maxComputeInvocationsPerWorkgroup: 1024 },"
        f" info: {{ subgroupMinSize: {sizes[0]}, subgroupMaxSize: {sizes[1]},"
        f" subgroupMatrixConfigs: {json.dumps(configs)} }} }}"
    )
    out = _node(
        page,
        'import { chooseLibrary } from "./mlcweb.js";\n'
        f"const c = chooseLibrary({json.dumps(manifest)}, {adapter});\n"
        "console.log(`${c.matrix ? c.matrix.kernels : 'none'} ${c.needs.workgroupBytes} ${!!c.needs.matrix}`);\n",
    )
    assert out == ("m-webgpu-matrix.json 28672 true" if used else "none 8192 false")


@pytest.mark.parametrize(
    ("storage", "chosen"), [(49152, "m-webgpu-matrix-49152.json 45568"), (32768, "m-webgpu-matrix.json 28672")]
)
def test_the_page_takes_the_largest_matrix_table_the_adapter_grants(page: Path, storage: int, chosen: str) -> None:
    """chooseMatrix: of the library's matrix tables (its own, and those planned for more workgroup memory
    in ``larger``), the one declaring the most workgroup memory the adapter grants; the device request
    asks for that much."""
    large = {"kernels": "m-webgpu-matrix-49152.json", "count": 3, "config": MATRIX, "workgroup_storage_bytes": 45568}
    matrix = {"kernels": "m-webgpu-matrix.json", "count": 3, "config": MATRIX, "workgroup_storage_bytes": 28672}
    manifest = {
        "library": "m-webgpu.wasm",
        "webgpu": {"workgroup_storage_bytes": 8192, "matrix": {**matrix, "larger": [large]}},
    }
    adapter = (
        '{ features: new Set(["subgroups", "chromium-experimental-subgroup-matrix"]),'
        f" limits: {{ maxComputeWorkgroupStorageSize: {storage}, maxComputeInvocationsPerWorkgroup: 1024 }},"
        f" info: {{ subgroupMinSize: 32, subgroupMaxSize: 32, subgroupMatrixConfigs: {json.dumps([F16_16])} }} }}"
    )
    out = _node(
        page,
        'import { chooseLibrary } from "./mlcweb.js";\n'
        f"const c = chooseLibrary({json.dumps(manifest)}, {adapter});\n"
        "console.log(`${c.matrix.kernels} ${c.needs.workgroupBytes}`);\n",
    )
    assert out == chosen


def test_matrix_kernels_replace_the_library_shaders_of_their_names(page: Path) -> None:
    """installMatrixKernels: a listed shader is created from the kernel's code, dispatched on the kernel's
    grid in place of the library's launch dimensions (its buffer and POD arguments passed as they are);
    other shaders are untouched."""
    out = _node(
        page,
        'import { installMatrixKernels } from "./mlcweb.js";\n'
        "const made = [];\n"
        "const ctx = { createShaderAsync: async (finfo, code) => {\n"
        "  made.push([finfo.name, code, finfo.launch_param_tags]); return (...args) => args; } };\n"
        "ctx.createShader = ctx.createShaderAsync;\n"
        'installMatrixKernels(ctx, { k_kernel: { code: "MATRIX", grid: [5, 7, 1] } });\n'
        'const tags = ["blockIdx.x", "threadIdx.x", "threadIdx.y", "paramWriteAccess:[0,1]"];\n'
        "const info = (name, args) => ({ name, arg_types: args, launch_param_tags: tags });\n"
        'const f = await ctx.createShaderAsync(info("k_kernel", ["handle", "handle"]), "TVM");\n'
        'const g = await ctx.createShaderAsync(info("other_kernel", ["handle"]), "TVM");\n'
        "console.log(JSON.stringify([made, f('a', 'b', 40, 16, 16), g('a', 40, 16, 16)]));\n",
    )
    made, replaced, other = json.loads(out)
    assert made[0] == ["k_kernel", "MATRIX", ["blockIdx.x", "blockIdx.y", "paramWriteAccess:[0,1]"]]
    assert made[1] == ["other_kernel", "TVM", ["blockIdx.x", "threadIdx.x", "threadIdx.y", "paramWriteAccess:[0,1]"]]
    assert replaced == ["a", "b", 5, 7] and other == ["a", 40, 16, 16]

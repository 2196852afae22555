"""benchmarks/webgpu/common.mjs: the runners' helpers that need no GPU, run in node."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

COMMON = Path(__file__).resolve().parents[2] / "benchmarks" / "webgpu" / "common.mjs"


def _node(tmp_path: Path, script: str) -> str:
    (tmp_path / "run.mjs").write_text(f'import {{ limitPipelineCreation }} from "{COMMON.as_uri()}";\n' + script)
    done = subprocess.run(["node", "run.mjs"], cwd=tmp_path, capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def test_pipeline_creation_runs_a_few_at_a_time(tmp_path: Path) -> None:
    """limitPipelineCreation: of ten shaders tvmjs asks for at once, at most `inFlight` are being created at
    any moment, all ten are made, in the order asked, and a failed one rejects its own promise only; 0
    leaves tvmjs' own (all at once)."""
    out = _node(
        tmp_path,
        "let running = 0, most = 0; const order = [];\n"
        "const make = () => ({ createShaderAsync: async (finfo) => {\n"
        "  running += 1; most = Math.max(most, running); order.push(finfo.name);\n"
        "  await new Promise((r) => setTimeout(r, 5)); running -= 1;\n"
        '  if (finfo.name === "k3") throw new Error("bad shader"); return finfo.name; } });\n'
        "const ctx = make();\n"
        "const limit = limitPipelineCreation(ctx, 3);\n"
        "const asks = Array.from({ length: 10 }, (_, i) => ctx.createShaderAsync({ name: `k${i}` }));\n"
        "const made = await Promise.allSettled(asks);\n"
        "const limited = most; most = 0;\n"
        "const free = make(); limitPipelineCreation(free, 0);\n"
        "await Promise.allSettled(Array.from({ length: 10 }, (_, i) => free.createShaderAsync({ name: `f${i}` })));\n"
        "const results = made.map((m) => m.value || m.reason.message);\n"
        "console.log(JSON.stringify([limit, limited, most, order.slice(0, 10), results]));\n",
    )
    limit, limited, unlimited, order, made = json.loads(out)
    assert (limit, limited, unlimited) == (3, 3, 10)
    assert order == [f"k{i}" for i in range(10)]
    assert made == ["k0", "k1", "k2", "bad shader", *[f"k{i}" for i in range(4, 10)]]

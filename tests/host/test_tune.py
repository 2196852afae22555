"""mlcweb tune over a TVM RPC tracker on loopback: two CPU servers, resume, a server dying, the database
applied in a build."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tiny_bert_plugin
import torch
import tvm
from tvm.s_tir.analysis import estimate_tir_flops

import mlcweb_passes as mp
from mlcweb import BuildOptions
from mlcweb.build import build
from mlcweb.databases import compact_database
from mlcweb.plugins import PluginHost
from mlcweb.runtime import load
from mlcweb.tune import TuneOptions, default_schedule, extract_tuning_tasks, summary_table, tune

KEY = "mlcweb-test-cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: object, what: str, timeout: float = 60) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise TimeoutError(what)


@pytest.fixture
def rpc(tmp_path: Path) -> Iterator[tuple[str, list[subprocess.Popen[bytes]], list[Path]]]:
    """A tracker and two RPC servers on 127.0.0.1, each server logging to its own file."""
    from tvm import rpc as tvm_rpc

    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    tracker_log = tmp_path / "tracker.log"
    tracker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tvm.exec.rpc_tracker",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-end",
            str(port + 1),
        ],
        stdout=tracker_log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    procs.append(tracker)

    def listening() -> bool:
        if tracker.poll() is not None:
            raise RuntimeError(f"the RPC tracker exited: {tracker_log.read_text()[-2000:]}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    _wait(listening, "tracker did not start")
    logs = [tmp_path / f"server{i}.log" for i in range(2)]
    servers = []
    for log in logs:
        server_port = _free_port()
        servers.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tvm.exec.rpc_server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(server_port),
                    "--port-end",
                    str(server_port + 1),
                    "--tracker",
                    f"127.0.0.1:{port}",
                    "--key",
                    KEY,
                ],
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
    procs += servers

    def registered() -> bool:
        info = tvm_rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"].get(KEY, {})
        return int(info.get("free", 0)) == 2

    try:
        _wait(registered, "the two servers did not register with the tracker")
        yield f"127.0.0.1:{port}", servers, logs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_tune_over_rpc_resume_and_a_dying_server(
    rpc: tuple[str, list[subprocess.Popen[bytes]], list[Path]], host: PluginHost, tmp_path: Path
) -> None:
    tracker, servers, logs = rpc
    db = tmp_path / "db"
    base = TuneOptions(
        build=BuildOptions(target="llvm", out=db),
        db=db,
        rpc_tracker=tracker,
        rpc_key=KEY,
        builders=2,
        trials_per_round=4,
        search="replay-trace",
    )
    tasks, _ = extract_tuning_tasks(host, "tiny-bert", base)
    # Heaviest first: runs per use times FLOPs.
    cost = [t.weight * max(1.0, float(estimate_tir_flops(t.mod))) for t in tasks]
    assert cost == sorted(cost, reverse=True) and all(t.weight >= 1 for t in tasks)
    # The two heaviest matmuls, which have real schedule spaces.
    names = [t.name for t in tasks if "matmul" in t.name][:2]
    options = TuneOptions(**{**base.__dict__, "trials": 4, "tasks": ",".join(names)})

    results = tune(host, "tiny-bert", options, echo=lambda _: None)
    print(summary_table(results))
    assert [r.name for r in results] == names
    assert all(r.status == "tuned" and r.trials >= 4 and r.tuned_s and r.fallback_s for r in results)
    for log in logs:  # both servers ran measurements
        assert "load_module" in log.read_text(), f"{log.name} ran no measurement"

    # A re-run with enough records measures nothing and changes nothing.
    records = db / "database_tuning_record.json"
    before = records.read_text()
    again = tune(host, "tiny-bert", options, echo=lambda _: None)
    assert [r.status for r in again] == ["skipped (done)"] * 2 and records.read_text() == before

    # More trials while server 0 dies as soon as it measures: the run finishes on server 1, the records
    # of the first run are all still there, and the new ones are added to them.
    seen = logs[0].read_text().count("load_module")

    def kill_server0() -> None:
        _wait(lambda: logs[0].read_text().count("load_module") > seen, "server 0 measured nothing", 600)
        servers[0].kill()

    killer = threading.Thread(target=kill_server0, daemon=True)
    killer.start()
    more = tune(host, "tiny-bert", TuneOptions(**{**options.__dict__, "trials": 8}), echo=lambda _: None)
    killer.join(timeout=1)
    assert servers[0].poll() is not None, "server 0 was never killed"
    after = records.read_text()
    assert after.startswith(before) and len(after.splitlines()) > len(before.splitlines())
    assert all(r.status == "tuned" and r.trials >= 8 for r in more), summary_table(more)

    # Each task's default schedule is a record too (so a build never applies a slower tuned one), and
    # compacting keeps the best 2 records per workload.
    saved = mp.load_database(db)
    for task in (t for t in tasks if t.name in names):
        default = str(default_schedule(task, tvm.target.Target("llvm")).trace)
        traces = [str(r.trace) for r in saved.get_top_k(saved.commit_workload(task.mod), 1000)]
        assert default in traces, f"no default record for {task.name}"
    compact = tmp_path / "db-compact"
    assert compact_database(db, compact, top_k=2) == 4
    assert len((compact / "database_tuning_record.json").read_text().splitlines()) == 4

    # The compacted database applies in a build, and the tuned kernels compute the same as PyTorch.
    out = tmp_path / "bert-tuned"
    result = build(host, "tiny-bert", BuildOptions(target="llvm", out=out, database=compact), progress=False)
    assert set(names) <= set(result.schedules.tuned)
    assert json.loads((out / "manifest.json").read_text())["database"] == "--db"
    ids = np.random.default_rng(0).integers(0, 128, size=(1, 16)).astype(np.int32)
    got = load(out)("main", ids)
    with torch.no_grad():
        want = tiny_bert_plugin.reference_model(tiny_bert_plugin.DEFAULT_CONFIG)(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4)


def test_tuning_leaves_no_worker_processes(host: PluginHost, tmp_path: Path) -> None:
    """A tuning run ends the builder and runner processes it started (each holds about 500 MB)."""
    import psutil

    options = TuneOptions(
        build=BuildOptions(target="llvm", out=tmp_path), db=tmp_path / "db", trials=1, builders=1, max_tasks=1,
        search="replay-trace",
    )  # fmt: skip
    tune(host, "tiny-bert", options, echo=lambda _: None)
    workers = [p for p in psutil.Process().children(recursive=True) if "popen_worker" in " ".join(p.cmdline())]
    assert workers == []


def test_webgpu_candidates_are_checked_as_wgsl(monkeypatch: pytest.MonkeyPatch) -> None:
    """A schedule measured natively for WebGPU is also compiled for WebGPU: one whose WGSL Dawn rejects
    (here an int8 buffer) fails as a candidate that does not build; a valid one builds."""
    from tvm.script import tirx as T

    from mlcweb.tune import _wgsl_target, build_candidate
    from mlcweb.wgsl_check import WGSLCheckError

    monkeypatch.setenv("MLCWEB_WGSL_CHECK", "require")

    def kernel(dtype: str) -> tvm.IRModule:
        @T.prim_func(s_tir=True)
        def add_one(a: T.Buffer((64,), dtype), b: T.Buffer((64,), dtype)) -> None:
            T.func_attr({"global_symbol": "main", "tirx.noalias": True})
            for i in T.thread_binding(64, thread="threadIdx.x"):
                with T.sblock("b"):
                    v = T.axis.spatial(64, i)
                    b[v] = a[v] + T.cast(1, dtype)

        return tvm.IRModule({"main": add_one})

    options = TuneOptions(build=BuildOptions(target="webgpu", out=Path("unused")), db=Path("unused"))
    wgsl = _wgsl_target(options)
    assert wgsl is not None
    llvm = tvm.target.Target("llvm")
    with pytest.raises(WGSLCheckError, match="'i8' type used"):
        build_candidate(kernel("int8"), llvm, None, wgsl=wgsl)
    assert build_candidate(kernel("float32"), tvm.target.Target("cuda"), None, wgsl=wgsl) is not None

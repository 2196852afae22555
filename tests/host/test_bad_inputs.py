"""What a user can get wrong, one line each: nothing they own is lost, no input crashes the runtime."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlcweb import BuildOptions
from mlcweb.build import build
from mlcweb.errors import CorruptArtifactError, MlcwebError
from mlcweb.plugins import PluginHost
from mlcweb.runtime import load

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import tiny_bert_plugin

    host = PluginHost([("tiny_bert", tiny_bert_plugin)], entry_points=False)
    out = tmp_path_factory.mktemp("bad") / "bert"
    build(host, "tiny-bert", BuildOptions(target="llvm", out=out, use_cache=False), progress=False)
    return out


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.getcwd()])}
    return subprocess.run(
        [sys.executable, "-m", "mlcweb.cli", *args], env=env, capture_output=True, text=True, check=False, cwd=cwd
    )


# ------------------------------------------------------------------------------------------------ --out
@pytest.mark.parametrize("content", ["notes", "folder"])
def test_out_never_replaces_a_folder_mlcweb_did_not_write(tmp_path: Path, host: PluginHost, content: str) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    if content == "folder":
        (out / "mydata").mkdir()
        (out / "mydata" / "a.bin").write_bytes(b"\0" * 10)
    with pytest.raises(MlcwebError, match=r"is a folder that is not an mlcweb build.*pass a new or empty folder"):
        build(host, "tiny-bert", BuildOptions(target="llvm", out=out), progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left beside it


def test_out_onto_a_file_is_refused(tmp_path: Path, host: PluginHost) -> None:
    target = tmp_path / "file.txt"
    target.write_text("keep")
    with pytest.raises(MlcwebError, match="is a file, not a folder"):
        build(host, "tiny-bert", BuildOptions(target="llvm", out=target), progress=False)
    assert target.read_text() == "keep"


def test_out_that_cannot_be_written_is_one_line() -> None:
    result = _cli("build", "stable-diffusion", "--out", "/proc/mlcweb-out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "mlcweb: error: cannot write a build beside /proc/mlcweb-out" in result.stderr


@pytest.mark.parametrize("size", ["16", "-1"])
def test_a_subgroup_size_tvm_cannot_build_is_one_line(tmp_path: Path, size: str) -> None:
    result = _cli(
        "build", "stable-diffusion", "--target", "webgpu", "--subgroup-size", size, "--out", str(tmp_path / "w")
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        f"mlcweb: error: subgroup size {size} is not one TVM builds webgpu reductions for; choose 32" in result.stderr
    )
    assert not (tmp_path / "w").exists()


def test_a_build_replaces_an_mlcweb_build_and_is_world_readable(artifacts: Path, host: PluginHost) -> None:
    assert artifacts.stat().st_mode & 0o755 == 0o755
    (artifacts.parent / f".{artifacts.name}.tmp-999999999-x").mkdir()  # left by a killed build
    build(host, "tiny-bert", BuildOptions(target="llvm", out=artifacts, use_cache=False), progress=False)
    assert json.loads((artifacts / "manifest.json").read_text())["model"] == "tiny-bert"
    assert not list(artifacts.parent.glob(f".{artifacts.name}.*"))


# -------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("bad", [128, 60000, 1_000_000_000, -5])
def test_token_ids_outside_the_vocabulary_are_refused(artifacts: Path, bad: int) -> None:
    arts = load(artifacts)
    spec = arts.input_specs("main")[0]
    assert spec["range"] == [0, 127]
    ids = np.zeros(spec["shape"], dtype="int32")
    ids[0, 3] = bad
    with pytest.raises(MlcwebError, match=rf"input 'input_ids' holds {bad}, outside its range 0..127"):
        arts("main", ids)


def test_run_reports_out_of_range_ids_in_one_line(artifacts: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "in.npz", input_ids=np.full((1, 16), 60000, dtype="int32"))
    result = _cli("run", str(artifacts), "--inputs", str(tmp_path / "in.npz"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "outside its range 0..127" in result.stderr


def test_run_draws_random_ids_from_the_declared_range(artifacts: Path) -> None:
    result = _cli("run", str(artifacts))
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------ artifacts
def _copy(artifacts: Path, tmp_path: Path) -> Path:
    import shutil

    dest = tmp_path / "copy"
    shutil.copytree(artifacts, dest)
    return dest


def _edit_manifest(root: Path, **changes: object) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.update(changes)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_a_library_outside_the_hashed_files_is_never_loaded(artifacts: Path, tmp_path: Path) -> None:
    root = _copy(artifacts, tmp_path)
    evil = tmp_path / "evil.so"
    evil.write_bytes((root / json.loads((root / "manifest.json").read_text())["library"]).read_bytes())
    _edit_manifest(root, library="../evil.so")
    with pytest.raises(CorruptArtifactError, match="not one of its hashed files"):
        load(root)


@pytest.mark.parametrize("path", ["../outside.bin", "/etc/passwd", "a/../../b"])
def test_manifest_paths_stay_inside_the_folder(artifacts: Path, tmp_path: Path, path: str) -> None:
    root = _copy(artifacts, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"][0]["path"] = path
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptArtifactError, match="artifact folder"):
        load(root)


def test_tensor_cache_shards_stay_inside_the_folder(artifacts: Path, tmp_path: Path) -> None:
    from mlcweb.tensor_cache import read_tensor_cache

    root = _copy(artifacts, tmp_path)
    index = json.loads((root / "tensor-cache.json").read_text())
    index["records"][0]["dataPath"] = "../../etc/passwd"
    (root / "tensor-cache.json").write_text(json.dumps(index))
    with pytest.raises(CorruptArtifactError, match="leaves the artifact folder"):
        read_tensor_cache(root)


def test_tensor_records_with_wrong_shapes_are_errors(artifacts: Path, tmp_path: Path) -> None:
    from mlcweb.tensor_cache import read_tensor_cache

    root = _copy(artifacts, tmp_path)
    index = json.loads((root / "tensor-cache.json").read_text())
    index["records"][0]["records"][0]["shape"] = [10**6, 10**6]
    (root / "tensor-cache.json").write_text(json.dumps(index))
    with pytest.raises(CorruptArtifactError, match=r"records .* bytes for shape"):
        read_tensor_cache(root)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"{}", b"[1, 2]"])
def test_a_manifest_that_is_not_one_is_one_line(artifacts: Path, tmp_path: Path, content: bytes) -> None:
    root = _copy(artifacts, tmp_path)
    (root / "manifest.json").write_bytes(content)
    result = _cli("run", str(root))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "mlcweb: error:" in result.stderr and "rebuild the artifacts" in result.stderr


# ------------------------------------------------------------------------------------------ mlcweb run
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--function", "decode"], "--function 'decode' is not in"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--inputs", "NOTZIP"], "is not a readable .npz"),
        (["--inputs", "OBJECTS"], "is not a readable .npz"),
        (["--output", "DIR"], "is a folder; pass a file name"),
        (["--output", "/proc/x/out.npz"], "cannot write --output"),
    ],
)
def test_run_errors_are_one_line(artifacts: Path, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    np.savez(tmp_path / "objects.npz", input_ids=np.array([{"a": 1}], dtype=object))
    paths = {"NOTZIP": tmp_path / "bad.npz", "OBJECTS": tmp_path / "objects.npz", "DIR": tmp_path}
    result = _cli("run", str(artifacts), *[str(paths.get(a, a)) for a in args])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr


# ------------------------------------------------------------------------------------------------ Ctrl-C
def test_an_interrupt_a_library_swallows_still_ends_the_work() -> None:
    import signal

    from mlcweb.interrupts import Interrupts

    with Interrupts() as interrupts, pytest.raises(KeyboardInterrupt):
        with contextlib.suppress(BaseException):  # as dlight's try_inline does, with a bare except
            signal.raise_signal(signal.SIGINT)
        interrupts.check()


def test_an_interrupt_a_library_turns_into_another_error_still_ends_the_work() -> None:
    """torch.export, interrupted inside its dispatch, raises UnboundLocalError instead (seen in a build)."""
    import signal

    from mlcweb.interrupts import Interrupts

    with pytest.raises(KeyboardInterrupt), Interrupts():
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt as err:
            raise UnboundLocalError("cannot access local variable 'old_apply_views'") from err


def test_ctrl_c_during_a_build_keeps_the_old_output(artifacts: Path, tmp_path: Path) -> None:
    import shutil
    import signal
    import time

    out = tmp_path / "out"
    shutil.copytree(artifacts, out)
    before = (out / "manifest.json").read_bytes()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.getcwd()]), "MLCWEB_CACHE_DIR": str(tmp_path)}
    script = tmp_path / "build.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\nimport tiny_bert_plugin\n"
        "from mlcweb import BuildOptions\nfrom mlcweb.build import build\nfrom mlcweb.cli import run_command\n"
        "from mlcweb.plugins import PluginHost\n"
        "host = PluginHost([('b', tiny_bert_plugin)], entry_points=False)\n"
        f"options = BuildOptions(target='llvm', out=Path({str(out)!r}), use_cache=False)\n"
        "sys.exit(run_command(lambda: build(host, 'tiny-bert', options, progress=False) and 0))\n"
    )
    # Ctrl-C as a terminal sends it, whatever this suite inherited (a shell's background job ignores SIGINT,
    # and a child started so would ignore it until the build installs its handler)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # Python, torch and TVM imported: the build has made its temporary folder
    time.sleep(1)  # into the import or the lowering
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted; existing output was left as it was" in err and "Traceback" not in err
    assert (out / "manifest.json").read_bytes() == before
    assert not list(tmp_path.glob(".out.tmp-*"))


# ------------------------------------------------------------------------------------- cache and noise
def test_the_import_cache_can_be_listed_and_cleared(tmp_path: Path) -> None:
    import tiny_bert_plugin

    from mlcweb.import_cache import ImportCache

    os.environ["MLCWEB_CACHE_DIR"] = str(tmp_path / "cache")  # restored by the autouse fixture's monkeypatch
    host = PluginHost([("tiny_bert", tiny_bert_plugin)], entry_points=False)
    for width in (32, 48):
        options = BuildOptions(target="llvm", out=tmp_path / f"b{width}", config={"hidden_size": width})
        build(host, "tiny-bert", options, progress=False)
    (tmp_path / "cache" / "imports" / ".deadbeef-999999999-x").mkdir()  # a killed write's leftover
    cache = ImportCache(tmp_path / "cache")
    assert len(cache.entries()) == 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.getcwd()])}
    run = subprocess.run([sys.executable, "-m", "mlcweb.cli", "cache", "list"], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "2 imports" in run.stdout
    clear = [sys.executable, "-m", "mlcweb.cli", "cache", "clear", "--keep", "1"]
    assert subprocess.run(clear, env=env, capture_output=True, text=True).returncode == 0
    assert len(cache.entries()) == 1 and sorted(p.name for p in cache.root.iterdir()) == [cache.entries()[0][0]]


def test_a_build_prints_no_warnings(tmp_path: Path) -> None:
    """No TVM "Fast mode segfaults" per gather (they clamp now) and no torch.export deprecation."""
    script = tmp_path / "build.py"
    script.write_text(
        "from pathlib import Path\nimport tiny_bert_plugin\nfrom mlcweb import BuildOptions\n"
        "from mlcweb.build import build\nfrom mlcweb.plugins import PluginHost\n"
        "host = PluginHost([('b', tiny_bert_plugin)], entry_points=False)\n"
        f"build(host, 'tiny-bert', BuildOptions(target='llvm', out=Path({str(tmp_path / 'out')!r}), use_cache=False), "
        "progress=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.getcwd()])}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "warn" not in done.stderr.lower(), done.stderr[-2000:]

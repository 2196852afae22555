"""The runnable examples run."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_passes_demo_matches_pytorch() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "passes_demo.py")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "with softmax and cast fusion" in result.stdout and "max abs error vs PyTorch" in result.stdout


def test_build_and_deploy_scripts_write_a_png(tmp_path: Path) -> None:
    env_cache = {"MLCWEB_CACHE_DIR": str(tmp_path / "cache")}
    import os

    env = {**os.environ, **env_cache}
    out = tmp_path / "llvm"
    build = subprocess.run(
        [sys.executable, str(ROOT / "examples/stable_diffusion/build.py"), "--target", "llvm", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    assert "built stable-diffusion for llvm (float32)" in build.stdout
    png = tmp_path / "img.png"
    deploy = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples/stable_diffusion/deploy.py"),
            "--artifacts",
            str(out),
            "--prompt",
            "a red apple",
            "--steps",
            "3",
            "--output",
            str(png),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert deploy.returncode == 0, deploy.stderr[-2000:]
    from PIL import Image

    image = Image.open(png)
    assert image.size == (32, 32) and image.mode == "RGBA"
    assert "per step" in deploy.stdout
    # image-to-image from that picture (its alpha dropped); an unreadable one is one line
    again = tmp_path / "again.png"
    (tmp_path / "notimage.png").write_text("not an image")
    for init, code in ((png, 0), (tmp_path / "notimage.png", 2)):
        run = subprocess.run(
            [
                sys.executable, str(ROOT / "examples/stable_diffusion/deploy.py"), "--artifacts", str(out),
                "--prompt", "a green apple", "--steps", "4", "--init-image", str(init), "--strength", "0.5",
                "--output", str(again),
            ],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
        assert run.returncode == code and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert Image.open(again).size == (32, 32) and "is not an image this machine can read" in run.stderr
    bad = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples/stable_diffusion/deploy.py"),
            "--artifacts",
            str(tmp_path / "nope"),
            "--prompt",
            "x",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr


@pytest.mark.parametrize("output", ["DIR", "/proc/none/image.png"])
def test_deploy_checks_its_output_before_any_work(tmp_path: Path, output: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples/stable_diffusion/deploy.py"),
            "--artifacts", str(tmp_path / "not-built"),
            "--prompt", "x",
            "--output", str(tmp_path) if output == "DIR" else output,
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--output" in result.stderr and "not-built" not in result.stderr  # refused before loading

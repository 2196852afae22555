"""The page's JS CLIP tokenizer (the plugin's static/clip_tokenizer.js) against the Python one."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import mlcweb_stable_diffusion
import pytest
from mlcweb_stable_diffusion.tokenizer import Tokenizer, write_clip_vocab, write_tokenizer_json

from mlcweb.source_tree import web_dir
from mlcweb.web import WEB_RUNTIME_FILES

STATIC = Path(mlcweb_stable_diffusion.__file__).parent / "static"  # the page the plugin ships

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A  Café, naïve résumé!!  été 2024 😀",
    "don't stop-believing; it's 3.14159 -- isn't it?",
    "UPPER lower MiXeD\ttabs\nnewlines",
    "<|startoftext|> inside a prompt <|endoftext|>",
    "日本語のプロンプト, 中文提示, кириллица",
    "",
    " ".join(["very long prompt"] * 40),  # 120 words: truncated to 77 tokens
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jstok")
    write_clip_vocab(root / "tokenizer")
    write_tokenizer_json(root / "tokenizer")
    shutil.copy(STATIC / "clip_tokenizer.js", root / "clip_tokenizer.js")
    shutil.copy(web_dir() / WEB_RUNTIME_FILES["tokenizers.mjs"], root / "tokenizers.mjs")
    return root


def js_ids(root: Path, prompts: list[str], pad_id: int | None = None) -> list[list[int]]:
    script = """
import { readFileSync } from "node:fs";
import { ClipTokenizer } from "./clip_tokenizer.js";
const tok = new ClipTokenizer(JSON.parse(readFileSync("tokenizer/tokenizer.json", "utf8")), PAD);
const prompts = JSON.parse(readFileSync(0, "utf8"));
console.log(JSON.stringify(prompts.map((p) => Array.from(tok.encode(p)))));
"""
    (root / "run.mjs").write_text(script.replace("PAD", "undefined" if pad_id is None else str(pad_id)))
    out = subprocess.run(
        ["node", "run.mjs"], cwd=root, input=json.dumps(prompts), capture_output=True, text=True, check=True
    )
    result: list[list[int]] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_js_tokenizer_gives_the_python_ids(files: Path) -> None:
    python = Tokenizer(files / "tokenizer")
    got = js_ids(files, PROMPTS)
    for prompt, ids in zip(PROMPTS, got, strict=True):
        want = python(prompt)[0].tolist()
        assert ids == want, f"JS and Python tokenizers differ on {prompt!r}"
    assert all(len(ids) == 77 for ids in got)
    assert got[-1][-1] == 49407 and got[-1][-2] != 49407  # truncated: ends with the end token, no padding


def test_js_tokenizer_pads_as_sd2_does(files: Path) -> None:
    """SD 2.x pads with "!" (id 0), from the build's metadata.pad_token_id, as the Python tokenizer does."""
    sd2 = files.parent / "jstok-sd2"
    shutil.copytree(files, sd2)
    write_tokenizer_json(sd2 / "tokenizer", pad_token="!")
    python = Tokenizer(sd2 / "tokenizer", pad_token="!")
    got = js_ids(sd2, PROMPTS, pad_id=0)
    for prompt, ids in zip(PROMPTS, got, strict=True):
        assert ids == python(prompt)[0].tolist(), f"JS and Python tokenizers differ on {prompt!r}"
    assert got[0][-1] == 0 and 49407 in got[0]

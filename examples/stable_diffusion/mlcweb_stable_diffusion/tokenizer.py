"""The CLIP BPE tokenizer, offline.

With a diffusers model folder, its ``tokenizer/`` (vocab.json + merges.txt) is used. Without one, the
vocabulary is built from the BPE merges that ship inside the ``open-clip-torch`` package (the same
49408-token vocabulary as SD1.5's), written as vocab.json + merges.txt so the web app can load the very
same files.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
from transformers import CLIPTokenizer

from mlcweb.errors import MlcwebError

__all__ = [
    "END_OF_TEXT",
    "MAX_LENGTH",
    "Tokenizer",
    "check_tokenizer_folder",
    "copy_tokenizer_files",
    "folder_pad_token",
    "pad_token_id",
    "write_clip_vocab",
    "write_tokenizer_json",
]

MAX_LENGTH = 77
END_OF_TEXT = "<|endoftext|>"
_NUM_MERGES = 49152 - 256 - 2
log = logging.getLogger(__name__)


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _open_clip_merges() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise MlcwebError(
            "no CLIP vocabulary: pass --model with a diffusers folder (it has tokenizer/), or install "
            "open-clip-torch (pip install --no-deps open-clip-torch), which ships the BPE merges"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise MlcwebError(f"open-clip-torch is installed but {path} is missing; reinstall it")
    return path


def _clip_vocab() -> tuple[dict[str, int], list[str]]:
    with gzip.open(_open_clip_merges()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_vocab(out_dir: Path) -> tuple[Path, Path]:
    """Write the CLIP vocab.json and merges.txt built from open-clip-torch's merges into ``out_dir``."""
    vocab, merges = _clip_vocab()
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def _bpe_from_tokenizer_json(path: Path) -> tuple[dict[str, int], list[str]]:
    try:
        model = json.loads(path.read_text(encoding="utf-8"))["model"]
        vocab, merges = model["vocab"], model["merges"]
        if model.get("type") != "BPE" or not isinstance(vocab, dict):
            raise ValueError(f"a {model.get('type')} model, not CLIP's BPE")
        lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise MlcwebError(f"{path} is not a CLIP BPE tokenizer ({err}); fix or re-download the model folder") from err
    return {str(k): int(v) for k, v in vocab.items()}, lines


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """vocab.json and merges.txt of a folder's ``tokenizer/`` into ``dst``: copied where the folder has
    them (as the Hub's folders do), else taken from its tokenizer.json (what transformers 5 saves)."""
    dst.mkdir(parents=True, exist_ok=True)
    if (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        for name in ("vocab.json", "merges.txt"):
            (dst / name).write_bytes((src / name).read_bytes())
        return
    vocab, merges = _bpe_from_tokenizer_json(src / "tokenizer.json")
    (dst / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def check_tokenizer_folder(files_dir: Path) -> None:
    """A model folder's ``tokenizer/`` holds vocab.json + merges.txt or a tokenizer.json."""
    if (files_dir / "vocab.json").is_file() and (files_dir / "merges.txt").is_file():
        return
    if not (files_dir / "tokenizer.json").is_file():
        raise MlcwebError(
            f"{files_dir} has neither vocab.json + merges.txt nor tokenizer.json; re-download the model folder"
        )


def folder_pad_token(files_dir: Path) -> str:
    """The padding token a diffusers ``tokenizer/`` folder declares (SD 2.x pads with ``!``, SD1 with
    end-of-text), from tokenizer_config.json or special_tokens_map.json."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = files_dir / name
        if not path.is_file():
            continue
        try:
            pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            raise MlcwebError(
                f"{path} is not a readable JSON object ({err}); fix or re-download the model folder"
            ) from err
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str) and pad:
            return pad
    return END_OF_TEXT


def pad_token_id(pad_token: str, files_dir: Path | None) -> int:
    """The id of ``pad_token`` in the folder's vocab.json, or in the built-in vocabulary."""
    if files_dir is None:
        vocab, _ = _clip_vocab()
    elif (files_dir / "vocab.json").is_file():
        vocab = json.loads((files_dir / "vocab.json").read_text(encoding="utf-8"))
    else:
        vocab, _ = _bpe_from_tokenizer_json(files_dir / "tokenizer.json")
    if pad_token not in vocab:
        where = files_dir / "vocab.json" if files_dir else "the CLIP vocabulary"
        raise MlcwebError(f"the padding token {pad_token!r} is not in {where}")
    return int(vocab[pad_token])


def write_tokenizer_json(files_dir: Path, pad_token: str = END_OF_TEXT) -> Path:
    """Write ``tokenizer.json`` (the Hugging Face fast-tokenizer format the web page's JS tokenizer reads)
    next to vocab.json and merges.txt, converted from them by transformers' CLIPTokenizerFast. The padding
    token is a special token there as in the Python tokenizer (SD 2.x's ``!`` in a prompt is id 0)."""
    from transformers import CLIPTokenizerFast

    fast = CLIPTokenizerFast(
        str(files_dir / "vocab.json"),
        str(files_dir / "merges.txt"),
        pad_token=pad_token,
        model_max_length=MAX_LENGTH,
    )
    path = files_dir / "tokenizer.json"
    # sort_keys keeps the file byte-identical across runs (reproducible builds).
    data = json.loads(fast.backend_tokenizer.to_str())
    path.write_text(json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n")
    return path


class Tokenizer:
    """Prompt -> 77 int32 token ids (start, BPE tokens, end, padded with ``pad_token``: end-of-text for
    SD1, ``!`` for SD 2.x)."""

    def __init__(self, files_dir: Path, pad_token: str = END_OF_TEXT) -> None:
        vocab, merges = files_dir / "vocab.json", files_dir / "merges.txt"
        missing = [p.name for p in (vocab, merges) if not p.is_file()]
        if missing:
            raise MlcwebError(f"tokenizer folder {files_dir} lacks {', '.join(missing)}")
        self.files_dir = files_dir
        self.hf = CLIPTokenizer(str(vocab), str(merges), pad_token=pad_token, model_max_length=MAX_LENGTH)

    def __call__(self, prompt: str) -> np.ndarray:
        ids = self.hf(prompt, truncation=False)["input_ids"]
        if len(ids) > MAX_LENGTH:
            log.warning(
                "prompt is %d tokens; CLIP reads %d, so it is truncated to: %r",
                len(ids),
                MAX_LENGTH,
                self.hf.decode(ids[1 : MAX_LENGTH - 1]),
            )
        out = self.hf(prompt, padding="max_length", max_length=MAX_LENGTH, truncation=True)["input_ids"]
        return np.asarray(out, dtype=np.int32)[None, :]

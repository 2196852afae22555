import logging
from pathlib import Path

import numpy as np
import pytest
from mlcweb_stable_diffusion.tokenizer import MAX_LENGTH, Tokenizer, write_clip_vocab

from mlcweb.errors import MlcwebError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok")
    write_clip_vocab(out)
    return Tokenizer(out)


def test_known_prompt_gives_clip_ids(tokenizer: Tokenizer) -> None:
    ids = tokenizer("a photo of a cat")
    assert ids.shape == (1, MAX_LENGTH) and ids.dtype == np.int32
    # CLIP ViT-L/14 ids: <|startoftext|> a photo of a cat <|endoftext|>, padded with <|endoftext|>
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()
    assert len(tokenizer.hf) == 49408


def test_empty_prompt_is_start_then_padding(tokenizer: Tokenizer) -> None:
    ids = tokenizer("")
    assert ids[0, 0] == 49406 and (ids[0, 1:] == 49407).all()


def test_long_prompt_is_truncated_with_a_warning(tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        ids = tokenizer("cat " * 100)
    assert ids.shape == (1, MAX_LENGTH) and ids[0, -1] == 49407
    assert "truncated" in caplog.text and "102 tokens" in caplog.text


def test_folder_without_vocab_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MlcwebError, match=r"lacks vocab\.json, merges\.txt"):
        Tokenizer(tmp_path)

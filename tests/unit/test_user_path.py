"""The steps right after the README's set-up, as a new user takes them (issue 26): each test
fails on the code before its fix."""
from __future__ import annotations

import pytest

from nsa_dist.config import ModelConfig


# ------------------------------------------------------------------ defect 3: a garbage tokenizer

def test_garbage_tokenizer_file_is_named(tmp_path):
    from nsa_dist.data import Tokenizer

    bad = tmp_path / "not_a_tokenizer.model"
    bad.write_bytes(b"\x8a\x01garbage that is no protobuf \xff\xfe" * 7)
    with pytest.raises(ValueError, match="not_a_tokenizer.model is not a SentencePiece model"):
        Tokenizer.load(bad)



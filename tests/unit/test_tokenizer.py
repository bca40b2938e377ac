"""Tokenizer training (deterministic, cached), special ids, round trips, errors."""
import json
from pathlib import Path

import pytest

pytest.importorskip("sentencepiece")

from toolbox import load_tool  # noqa: E402
from nsa_dist.data.tokenizer import META_FILE, MODEL_FILE, Tokenizer, sample_lines, train_tokenizer

QUIET = dict(log=lambda m: None)
ROOT = Path(__file__).resolve().parents[2]




def test_training_is_deterministic(corpus_dir, tokenizer_dir, tmp_path):
    meta = train_tokenizer([str(corpus_dir)], 400, tmp_path / "again", **QUIET)
    assert meta["reused"] is False
    assert (tmp_path / "again" / MODEL_FILE).read_bytes() == (tokenizer_dir / MODEL_FILE).read_bytes()
    a, b = Tokenizer.load(tokenizer_dir), Tokenizer.load(tmp_path / "again")
    text = (corpus_dir / "mod_01.py").read_text()
    assert a.encode(text) == b.encode(text)
    assert a.sha256 == b.sha256 == json.loads((tokenizer_dir / META_FILE).read_text())["sha256"]


def test_special_ids_and_metadata(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.vocab_size == len(tok) == 400
    meta = json.loads((tokenizer_dir / META_FILE).read_text())
    assert {k: meta[k] for k in ("vocab_size", "bos_id", "eos_id", "pad_id")} == {
        "vocab_size": 400, "bos_id": 1, "eos_id": 2, "pad_id": 3}
    ids = tok.encode_document("x = 1")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids[1:-1] == tok.encode("x = 1")
    assert tok.decode(ids) == "x = 1"  # special tokens decode to nothing
    # Loading from the model file directly works too.
    assert Tokenizer.load(tokenizer_dir / MODEL_FILE).encode("def f():") == tok.encode("def f():")


@pytest.mark.parametrize("text", [
    "def f(self):\n    return self.value\n",
    "    \n\n\t\tmixed \t whitespace   kept  \n",
    "unseen: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 😀 漢字 Ωμέγα",
    "digits 1234567890 and trailing space ",
    "",
], ids=["code", "whitespace", "unicode", "digits", "empty"])
def test_round_trip_exact(tokenizer_dir, text):
    tok = Tokenizer.load(tokenizer_dir)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids  # byte fallback: nothing is unknown
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_newline_and_indent_are_cheap(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    assert len(tok.encode("\n")) == 1
    assert len(tok.encode("        ")) <= 2  # indentation is learned as whitespace pieces


def test_cache_reuse_and_invalidation(corpus_dir, tmp_path):
    out = tmp_path / "tok"
    assert train_tokenizer([str(corpus_dir)], 320, out, **QUIET)["reused"] is False
    mtime = (out / MODEL_FILE).stat().st_mtime_ns
    assert train_tokenizer([str(corpus_dir)], 320, out, **QUIET)["reused"] is True
    assert (out / MODEL_FILE).stat().st_mtime_ns == mtime
    assert train_tokenizer([str(corpus_dir)], 320, out, force=True, **QUIET)["reused"] is False
    assert train_tokenizer([str(corpus_dir)], 330, out, **QUIET)["reused"] is False  # settings
    assert Tokenizer.load(out).vocab_size == 330
    # A model that no longer matches its metadata is not reused (and fails to load).
    (out / MODEL_FILE).write_bytes((out / MODEL_FILE).read_bytes() + b"\0")
    with pytest.raises(ValueError, match="sha256"):
        Tokenizer.load(out)
    assert train_tokenizer([str(corpus_dir)], 330, out, **QUIET)["reused"] is False
    Tokenizer.load(out)


def test_cli_trains_then_reuses(corpus_dir, tmp_path, capsys):
    tool = load_tool("train_tokenizer")
    args = ["--input", str(corpus_dir), "--vocab-size", "320", "--output", str(tmp_path / "t")]
    assert tool.main(args) == 0
    assert "trained" in capsys.readouterr().out
    assert tool.main(args) == 0
    assert "reused" in capsys.readouterr().out


def test_bad_input_errors(corpus_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer([str(corpus_dir)], 100, tmp_path / "a", **QUIET)
    with pytest.raises(ValueError, match="Vocabulary size too high"):
        train_tokenizer([str(corpus_dir / "notes.txt")], 5000, tmp_path / "a", **QUIET)
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer([str(corpus_dir)], 400, tmp_path / "a", model_type="wordpiece", **QUIET)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_tokenizer([str(tmp_path / "nope")], 400, tmp_path / "a", **QUIET)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer([str(tmp_path / "empty")], 400, tmp_path / "a", **QUIET)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer([str(tmp_path / "blank")], 400, tmp_path / "a", **QUIET)
    with pytest.raises(FileNotFoundError, match="train_tokenizer"):
        Tokenizer.load(tmp_path / "a")
    assert not (tmp_path / "a" / MODEL_FILE).exists()
    assert load_tool("train_tokenizer").main(
        ["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "a")]) == 2
    assert "empty corpus" in capsys.readouterr().err


def test_sample_lines_is_seeded_and_bounded():
    texts = [f"line {i}\n\n  \nother {i}" for i in range(500)]
    a = sample_lines(texts, 100, seed=1)
    assert len(a) == 100 and a == sample_lines(texts, 100, seed=1)
    assert a != sample_lines(texts, 100, seed=2)
    assert all(line.strip() for line in a)
    assert sample_lines(texts, 10_000, seed=1) == [l for t in texts for l in t.split("\n") if l.strip()]

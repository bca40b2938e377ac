"""SentencePiece tokenizer: training (cached, deterministic) and loading.

A tokenizer directory holds ``tokenizer.model`` (the SentencePiece model) and
``tokenizer.json`` (metadata: vocab size, special ids, the model's sha256, and the
fingerprint of the inputs and settings it was trained from, used for caching).

Settings chosen for source code and exact round trips: no normalization, spaces kept
as they are (whitespace-only pieces allowed, so indentation is a few tokens), newline
a single dedicated token, digits split, and byte fallback so any text encodes with no
``<unk>``. Special ids are fixed: unk 0, bos 1, eos 2, pad 3.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from nsa_dist.data.corpus import discover_files, files_fingerprint, iter_documents
from nsa_dist.fileio import atomic_write

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"
META_FORMAT = "nsa_dist.tokenizer/1"
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
# SentencePiece skips training lines longer than this many bytes; we drop them first.
_MAX_LINE_BYTES = 4096


def _import_sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise ImportError("the tokenizer needs the 'sentencepiece' package: "
                          "pip install sentencepiece (or pip install nsa_dist[train])") from None
    return sentencepiece


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Tokenizer:
    """A loaded SentencePiece model plus its special ids.

    ``encode(text) -> list[int]`` adds no special tokens; ``encode_document`` adds BOS/EOS.
    ``decode(ids) -> str`` drops special tokens.
    """

    def __init__(self, model_bytes: bytes, path: Path | None = None):
        spm = _import_sentencepiece()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except (RuntimeError, OSError, TypeError) as err:
            raise ValueError(f"{path or 'tokenizer model'} is not a SentencePiece model (sentencepiece "
                             f"cannot parse it: {type(err).__name__}); point 'tokenizer' at a directory made by tools/train_tokenizer.py or its "
                             f"{MODEL_FILE}") from None
        self.path = path
        self.sha256 = _sha256_bytes(model_bytes)
        self.vocab_size = int(self._sp.get_piece_size())
        self.unk_id = int(self._sp.unk_id())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        self.pad_id = int(self._sp.pad_id())
        for name in ("bos_id", "eos_id", "pad_id"):
            if getattr(self, name) < 0:
                raise ValueError(f"tokenizer model {path}: {name} is not set (-1); train it "
                                 f"with tools/train_tokenizer.py, which defines BOS/EOS/PAD")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load from a tokenizer directory (``tokenizer.model`` inside) or a ``.model`` file.

        With a ``tokenizer.json`` beside the model, its recorded sha256 must match the model
        (ValueError otherwise: the directory was half-written or mixed up).
        """
        path = Path(path)
        model = path / MODEL_FILE if path.is_dir() else path
        if not model.is_file():
            raise FileNotFoundError(f"no tokenizer model at {model}; train one with "
                                    f"tools/train_tokenizer.py --output {path}")
        data = model.read_bytes()
        meta_path = model.parent / META_FILE
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except json.JSONDecodeError:
                raise ValueError(f"{meta_path} is not valid JSON; retrain with "
                                 f"tools/train_tokenizer.py --force") from None
            if meta.get("sha256") not in (None, _sha256_bytes(data)):
                raise ValueError(f"{model} does not match {meta_path} (sha256 differs); "
                                 f"retrain with tools/train_tokenizer.py --force")
        return cls(data, model)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_document(self, text: str) -> list[int]:
        """[BOS] + encode(text) + [EOS]: the form a document takes in the shards."""
        return [self.bos_id] + list(self._sp.encode(text)) + [self.eos_id]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(x) for x in self._sp.encode(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id}, path={str(self.path)!r})")


def sample_lines(texts: Iterable[str], max_lines: int, seed: int) -> list[str]:
    """A seeded uniform sample (reservoir) of at most ``max_lines`` non-blank lines, in
    stream order. Bounded memory whatever the corpus size; same inputs -> same sample."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    n = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip() or len(line.encode("utf-8", "replace")) > _MAX_LINE_BYTES:
                continue
            if len(reservoir) < max_lines:
                reservoir.append((n, line))
            else:
                j = rng.randrange(n + 1)
                if j < max_lines:
                    reservoir[j] = (n, line)
            n += 1
    reservoir.sort()
    return [line for _, line in reservoir]


def _settings(vocab_size: int, model_type: str, max_sentences: int, seed: int,
              character_coverage: float) -> dict:
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback alone takes 256 "
                         f"ids plus 5 special; use at least 300")
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
    return {"vocab_size": int(vocab_size), "model_type": model_type,
            "max_sentences": int(max_sentences), "seed": int(seed),
            "character_coverage": float(character_coverage)}


def _fingerprint(settings: dict, files_fp: str) -> str:
    blob = json.dumps({"format": META_FORMAT, "settings": settings, "files": files_fp},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cached(out: Path, fingerprint: str) -> dict | None:
    meta_path, model_path = out / META_FILE, out / MODEL_FILE
    if not (meta_path.is_file() and model_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    if meta.get("sha256") != _sha256_bytes(model_path.read_bytes()):
        return None
    return meta


def train_tokenizer(inputs: Sequence[str] | None, vocab_size: int, output_dir: str | os.PathLike,
                    model_type: str = "bpe", max_sentences: int = 200_000, seed: int = 0,
                    character_coverage: float = 0.9995, force: bool = False,
                    log: Callable[[str], None] | None = None) -> dict:
    """Train a SentencePiece tokenizer on a corpus; cached and deterministic.

    inputs: corpus inputs as for ``corpus.discover_files`` (None -> the stdlib sources).
    max_sentences: lines sampled (seeded reservoir) for training; caps the time.
    Returns the metadata dict written to ``output_dir/tokenizer.json`` with ``reused``
    (True when an up-to-date tokenizer was already there and nothing was trained).
    Same inputs and settings give a byte-identical model (one training thread).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    settings = _settings(vocab_size, model_type, max_sentences, seed, character_coverage)
    files = discover_files(inputs)
    if not files:
        raise ValueError(f"empty corpus: no files found in {list(inputs or [])}")
    fingerprint = _fingerprint(settings, files_fingerprint(files))
    out = Path(output_dir)
    if not force:
        meta = _cached(out, fingerprint)
        if meta is not None:
            log(f"tokenizer: reused {out / MODEL_FILE} (inputs and settings unchanged)")
            return {**meta, "reused": True}

    t0 = time.time()
    lines = sample_lines((d.text for d in iter_documents(files)), max_sentences, seed)
    if not lines:
        raise ValueError(f"empty corpus: the {len(files)} input file(s) hold no text to train on")
    log(f"tokenizer: training {model_type} vocab={vocab_size} on {len(lines)} lines "
        f"from {len(files)} files")
    spm = _import_sentencepiece()
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=character_coverage,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            user_defined_symbols=["\n"], num_threads=1, input_sentence_size=0,
            shuffle_input_sentence=False, max_sentence_length=_MAX_LINE_BYTES + 96,
            minloglevel=2, **SPECIAL_IDS)
    except RuntimeError as e:  # e.g. vocab larger than the corpus supports
        raise ValueError(f"sentencepiece training failed for vocab_size={vocab_size}: {e}") from None
    data = buf.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / MODEL_FILE, data)
    tok = Tokenizer(data, out / MODEL_FILE)
    meta = {"format": META_FORMAT, "type": "sentencepiece", "model_file": MODEL_FILE,
            "vocab_size": tok.vocab_size, "unk_id": tok.unk_id, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "pad_id": tok.pad_id, "sha256": tok.sha256,
            "fingerprint": fingerprint, "settings": settings, "num_files": len(files),
            "num_training_lines": len(lines), "sentencepiece_version": spm.__version__}
    # The metadata goes last: it is what marks the directory complete for the cache check.
    atomic_write(out / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    log(f"tokenizer: wrote {out / MODEL_FILE} ({tok.vocab_size} pieces) in {time.time() - t0:.1f}s")
    return {**meta, "reused": False}

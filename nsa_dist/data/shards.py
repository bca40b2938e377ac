"""Binary token shards: format, reader, writer, and the corpus -> shards pipeline.

A shard ``P`` is two files:
- ``P.bin``: every document's tokens back to back, a flat array of ``uint16`` (vocab
  size <= 65536, so every id fits) or ``uint32``; read memory-mapped.
- ``P.idx``: little-endian header ``magic (8 bytes) | version u32 | itemsize u32 |
  num_docs u64 | num_tokens u64`` then ``num_docs + 1`` int64 document offsets
  (first 0, last num_tokens); document i is ``tokens[offsets[i]:offsets[i+1]]``.

``preprocess_corpus`` writes ``PREFIX_train`` and ``PREFIX_valid`` shards plus
``PREFIX_meta.json`` (the inputs' fingerprint, tokenizer, counts). The metadata is written
last and marks the set complete: a rerun with the same fingerprint is a no-op.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from nsa_dist.data.corpus import CorpusFile, discover_files, files_fingerprint, read_documents
from nsa_dist.fileio import AtomicFile, atomic_write

MAGIC = b"NSATOKS\x00"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")
META_FORMAT = "nsa_dist.shards/1"
SPLITS = ("train", "valid")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (0 .. vocab_size-1) fits, i.e. vocab_size <= 65536; else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size > 2 ** 32:
        raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token ids")
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


def shard_paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """(bin path, idx path) of shard ``prefix``."""
    p = str(prefix)
    return Path(p + ".bin"), Path(p + ".idx")


class TokenShard:
    """Read-only view of one shard: ``tokens`` (memmap [num_tokens]), ``offsets`` (int64
    [num_docs + 1]). Validated on open; a bad pair of files is a clear error naming both."""

    def __init__(self, prefix: str | os.PathLike):
        self.bin_path, self.idx_path = shard_paths(prefix)
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise FileNotFoundError(f"missing shard file {p}; build the shards with "
                                        f"tools/preprocess_data.py --output-prefix <prefix>")
        raw = self.idx_path.read_bytes()
        if len(raw) < _HEADER.size:
            raise ValueError(f"index {self.idx_path} is truncated ({len(raw)} bytes, header "
                             f"needs {_HEADER.size}); rerun tools/preprocess_data.py --force")
        magic, version, itemsize, num_docs, num_tokens = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise ValueError(f"{self.idx_path} is not an nsa_dist token index (bad magic)")
        if version != VERSION:
            raise ValueError(f"{self.idx_path}: index version {version}, this code reads "
                             f"{VERSION}; rerun tools/preprocess_data.py --force")
        if itemsize not in (2, 4):
            raise ValueError(f"{self.idx_path}: token item size {itemsize} is not 2 or 4")
        expect = _HEADER.size + 8 * (num_docs + 1)
        if len(raw) != expect:
            raise ValueError(f"index {self.idx_path} has {len(raw)} bytes, its header "
                             f"({num_docs} documents) says {expect}; rerun with --force")
        self.dtype = np.dtype(np.uint16 if itemsize == 2 else np.uint32)
        self.offsets = np.frombuffer(raw, dtype="<i8", offset=_HEADER.size).copy()
        if (self.offsets[0] != 0 or self.offsets[-1] != num_tokens
                or np.any(np.diff(self.offsets) <= 0)):
            raise ValueError(f"index {self.idx_path}: document offsets are not increasing "
                             f"from 0 to num_tokens={num_tokens}; rerun with --force")
        size = self.bin_path.stat().st_size
        if size != num_tokens * itemsize:
            raise ValueError(
                f"token file {self.bin_path} has {size} bytes but its index {self.idx_path} "
                f"says {num_tokens} tokens x {itemsize} bytes = {num_tokens * itemsize}: the "
                f"two do not match (truncated or mixed up); rerun tools/preprocess_data.py --force")
        if num_tokens == 0:
            raise ValueError(f"shard {self.bin_path} holds no tokens")
        self.num_docs, self.num_tokens = int(num_docs), int(num_tokens)
        self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(num_tokens,))

    def __len__(self) -> int:
        return self.num_docs

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document i (a view, [len_i])."""
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


class TokenShardWriter:
    """Appends documents to a shard's bin file under a temporary name; ``close()`` renames it
    into place, then writes the idx the same way, so a reader never sees a half-written pair
    as valid (a new bin beside an old idx fails the size check)."""

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise ValueError(f"token dtype must be uint16 or uint32, got {self.dtype}")
        self.bin_path, self.idx_path = shard_paths(prefix)
        self._bin = AtomicFile(self.bin_path)
        self._f = open(self._bin.tmp, "wb")
        self._offsets = [0]
        self._limit = np.iinfo(self.dtype).max

    @property
    def num_docs(self) -> int:
        return len(self._offsets) - 1

    @property
    def num_tokens(self) -> int:
        return self._offsets[-1]

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError("a document must be a non-empty 1-D list of token ids")
        if arr.min() < 0 or arr.max() > self._limit:
            raise ValueError(f"token id out of range for {self.dtype} (max {self._limit})")
        self._f.write(arr.astype(self.dtype).tobytes())
        self._offsets.append(self._offsets[-1] + arr.size)

    def close(self) -> None:
        self._f.close()
        self._bin.commit()
        header = _HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.num_docs, self.num_tokens)
        atomic_write(self.idx_path, header + np.asarray(self._offsets, dtype="<i8").tobytes())

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._bin.discard()


# ---------------------------------------------------------------- preprocessing pipeline

def split_of(key: str, valid_fraction: float, seed: int) -> tuple[str, float]:
    """("train" or "valid", u): u in [0, 1) from sha256(seed, key); valid iff u < fraction."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2 ** 64
    return ("valid" if u < valid_fraction else "train"), u


@functools.lru_cache(maxsize=2)
def _tokenizer(model_path: str):
    # One load per worker process (the pool calls _tokenize_file many times).
    from nsa_dist.data.tokenizer import Tokenizer
    return Tokenizer.load(model_path)


def _tokenize_file(args: tuple[str, CorpusFile]) -> list[tuple[str, np.ndarray, int]]:
    """[(document key, [BOS]+ids+[EOS] as int64, text characters)] for one corpus file."""
    model_path, file = args
    tok = _tokenizer(model_path)
    return [(d.key, np.asarray(tok.encode_document(d.text), dtype=np.int64), len(d.text))
            for d in read_documents(file)]


def meta_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}_meta.json")


def check_shards_tokenizer(prefix: str | os.PathLike, tok) -> None:
    """ValueError when the shards ``prefix`` were tokenized with another tokenizer than ``tok``
    (a loaded ``Tokenizer``): their ids would mean other text. Shards without metadata (not
    made by ``preprocess_corpus``) are not checked."""
    mp = meta_path(prefix)
    if not mp.is_file():
        return
    try:
        made_with = json.loads(mp.read_text()).get("tokenizer") or {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{mp} is not valid JSON ({err}); rerun tools/preprocess_data.py --force") from None
    if made_with.get("sha256") not in (None, tok.sha256):
        raise ValueError(f"the data shards {prefix}_* were made with the tokenizer {made_with.get('path')} "
                         f"(sha256 {made_with['sha256'][:12]}), but the run's tokenizer is {tok.path} "
                         f"(sha256 {tok.sha256[:12]}): set 'tokenizer' to the one the shards were made "
                         f"with, or rebuild the shards with tools/preprocess_data.py --tokenizer "
                         f"{Path(tok.path).parent}")


def _fingerprint(files_fp: str, tokenizer_sha: str, valid_fraction: float, seed: int) -> str:
    blob = json.dumps({"format": META_FORMAT, "files": files_fp, "tokenizer": tokenizer_sha,
                       "valid_fraction": valid_fraction, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _reusable(prefix: str, fingerprint: str) -> dict | None:
    mp = meta_path(prefix)
    if not mp.is_file():
        return None
    try:
        meta = json.loads(mp.read_text())
    except json.JSONDecodeError:
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    try:  # the shards must still be there and consistent
        for split, counts in meta["splits"].items():
            shard = TokenShard(f"{prefix}_{split}")
            if (shard.num_docs, shard.num_tokens) != (counts["num_docs"], counts["num_tokens"]):
                return None
    except (OSError, ValueError, KeyError):
        return None
    return meta


def preprocess_corpus(inputs: Sequence[str] | None, tokenizer_dir: str | os.PathLike,
                      output_prefix: str | os.PathLike, valid_fraction: float = 0.01,
                      workers: int = 1, seed: int = 1234, force: bool = False,
                      log: Callable[[str], None] | None = None) -> dict:
    """Tokenize a corpus into ``{prefix}_train`` / ``{prefix}_valid`` shards; cached.

    Each document becomes [BOS] + tokens + [EOS]. A document goes to valid iff
    ``split_of(key, valid_fraction, seed)`` says so; when that picks none (a small corpus)
    and valid_fraction > 0, the document with the smallest hash value moves to valid.
    Output is identical for any ``workers`` (files are tokenized in order).
    Returns the metadata written to ``{prefix}_meta.json`` plus ``reused``.
    Raises ValueError for an empty corpus (no documents or no tokens).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    from nsa_dist.data.tokenizer import Tokenizer
    tok = Tokenizer.load(tokenizer_dir)
    files = discover_files(inputs)
    if not files:
        raise ValueError(f"empty corpus: no files found in {list(inputs or [])}")
    prefix = str(output_prefix)
    fingerprint = _fingerprint(files_fingerprint(files), tok.sha256, valid_fraction, seed)
    if not force:
        meta = _reusable(prefix, fingerprint)
        if meta is not None:
            log(f"preprocess: reused {prefix}_{{train,valid}} (inputs and tokenizer unchanged)")
            return {**meta, "reused": True}

    meta_path(prefix).unlink(missing_ok=True)  # no stale completion marker while rewriting
    dtype = token_dtype(tok.vocab_size)
    splits = ("train", "valid") if valid_fraction > 0 else ("train",)
    writers = {s: TokenShardWriter(f"{prefix}_{s}", dtype) for s in splits}
    t0 = last = time.time()
    n_chars = 0
    held = None  # (u, ids) the train document with the smallest u, held back (see docstring)
    tasks = [(str(tok.path), f) for f in files]
    pool = None
    try:
        if workers > 1:
            import multiprocessing as mp
            # spawn: safe even when the caller already runs threads (torch, a trainer).
            pool = mp.get_context("spawn").Pool(workers)
            results = pool.imap(_tokenize_file, tasks, chunksize=4)
        else:
            results = map(_tokenize_file, tasks)
        for i, docs in enumerate(results, 1):
            for key, ids, nchars in docs:
                n_chars += nchars
                split, u = split_of(key, valid_fraction, seed)
                if split == "valid":
                    writers["valid"].add(ids)
                elif valid_fraction > 0 and (held is None or u < held[0]):
                    if held is not None:
                        writers["train"].add(held[1])
                    held = (u, ids)
                else:
                    writers["train"].add(ids)
            if time.time() - last > 2.0 or i == len(files):
                last = time.time()
                rate = n_chars / 1e6 / max(last - t0, 1e-9)
                log(f"preprocess: {i}/{len(files)} files, "
                    f"{sum(w.num_docs for w in writers.values()) + (held is not None)} docs, "
                    f"{sum(w.num_tokens for w in writers.values())} tokens, {rate:.1f} M chars/s")
        if held is not None:
            to_valid = writers["valid"].num_docs == 0 and writers["train"].num_docs > 0
            writers["valid" if to_valid else "train"].add(held[1])
        total = sum(w.num_docs for w in writers.values())
        if total == 0:
            raise ValueError(f"empty corpus: the {len(files)} input file(s) hold no text "
                             f"(no non-empty documents, no tokens)")
        for s, w in writers.items():
            if w.num_docs == 0:
                hint = ("use a smaller --valid-fraction" if s == "train"
                        else "give more documents or use --valid-fraction 0")
                raise ValueError(f"the {s} split got none of the {total} document(s); {hint}")
        for w in writers.values():
            w.close()
        for s in set(SPLITS) - set(writers):  # a stale split from an earlier run must not load
            for path in shard_paths(f"{prefix}_{s}"):
                path.unlink(missing_ok=True)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
    meta = {"format": META_FORMAT, "fingerprint": fingerprint, "dtype": dtype.name,
            "tokenizer": {"path": str(Path(tok.path).resolve()), "sha256": tok.sha256,
                          "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                          "eos_id": tok.eos_id, "pad_id": tok.pad_id},
            "valid_fraction": valid_fraction, "seed": seed, "num_files": len(files),
            "text_chars": n_chars,
            "splits": {s: {"num_docs": w.num_docs, "num_tokens": w.num_tokens}
                       for s, w in writers.items()}}
    atomic_write(meta_path(prefix), json.dumps(meta, indent=2) + "\n")
    counts = ", ".join(f"{s}: {c['num_docs']} docs / {c['num_tokens']} tokens"
                       for s, c in meta["splits"].items())
    log(f"preprocess: wrote {prefix}_* ({counts}, {dtype.name}) in {time.time() - t0:.1f}s")
    return {**meta, "reused": False}

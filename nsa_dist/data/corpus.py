"""Corpus discovery: which files are documents, and reading documents from them.

A document is one text file, or one record of a JSONL file (its ``text`` field).
The default corpus is the Python standard library's own ``.py`` sources found on
this machine, so the main job needs no download.

Every document has a stable ``key`` (its path relative to the input it was found
under, plus ``#<line>`` for a JSONL record). Keys, not absolute paths, decide the
train/valid split, so the same corpus splits the same way wherever it lives.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

# Name accepted in place of a path to mean "the standard library's sources".
STDLIB = "stdlib"
# Extensions taken from a user's directory (explicitly named files are always taken).
DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".jsonl")
# Folders never descended into: caches and installed third-party packages.
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", ".git", ".hg", ".svn"}


@dataclass(frozen=True)
class CorpusFile:
    """One file of the corpus: ``path`` on disk, ``key`` stable across machines."""
    path: Path
    key: str

    @property
    def is_jsonl(self) -> bool:
        return self.path.suffix.lower() == ".jsonl"


@dataclass(frozen=True)
class Document:
    key: str
    text: str


def stdlib_dir() -> Path:
    """Directory of the running interpreter's standard library sources."""
    for cand in (sysconfig.get_paths().get("stdlib"), os.path.dirname(os.__file__)):
        if cand and os.path.isfile(os.path.join(cand, "os.py")):
            return Path(cand)
    raise FileNotFoundError(
        "could not find the Python standard library sources (no os.py under sysconfig's "
        "'stdlib' path nor next to os.__file__); pass --input with your own corpus")


def _walk(root: Path, extensions: Sequence[str]) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorted in place so the walk order (and so the document order) is deterministic.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.lower().endswith(tuple(extensions)):
                found.append(Path(dirpath) / name)
    return found


def _expand_lists(inputs: list[str]) -> list[str]:
    """Replace each ``@LIST`` by the paths LIST holds (one a line; blank and # lines skipped;
    relative paths are relative to LIST's folder)."""
    out = []
    for item in inputs:
        if not item.startswith("@"):
            out.append(item)
            continue
        listing = Path(item[1:])
        if not listing.is_file():
            raise FileNotFoundError(f"file list {str(listing)!r} (from {item!r}) does not exist")
        for line in listing.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(str(listing.parent / line))
    return out


def discover_files(inputs: Sequence[str] | None = None,
                   extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> list[CorpusFile]:
    """Files of the corpus, deterministic order.

    inputs: paths (directories searched recursively for ``extensions``, or files taken as
        they are), ``@LIST`` (a text file naming such paths, one a line) and/or the word
        ``"stdlib"``; None or empty means ``["stdlib"]``.
    Returns the files in input order, each directory's files sorted by relative path.
    Raises FileNotFoundError for a path that does not exist.
    """
    inputs = _expand_lists(list(inputs) if inputs else [STDLIB])
    files: list[CorpusFile] = []
    seen: set[Path] = set()
    for item in inputs:
        if item == STDLIB:
            root, exts, prefix = stdlib_dir(), (".py",), "stdlib/"
        else:
            root, exts, prefix = Path(item), tuple(extensions), ""
        if not root.exists():
            raise FileNotFoundError(f"corpus input {str(root)!r} does not exist "
                                    f"(give a directory, a file, or {STDLIB!r})")
        if root.is_dir():
            base = prefix or (root.resolve().name + "/")
            pairs = [(p, base + p.relative_to(root).as_posix()) for p in _walk(root, exts)]
        else:
            pairs = [(root, root.name)]
        for path, key in pairs:
            real = path.resolve()
            if real not in seen:  # a file named twice is one document, not two
                seen.add(real)
                files.append(CorpusFile(path, key))
    return files


def read_documents(file: CorpusFile) -> Iterator[Document]:
    """The documents of one file: the whole text, or one per JSONL record (``text`` field).

    Undecodable bytes become U+FFFD so any file reads; empty documents are skipped.
    Raises ValueError for a JSONL line that is not an object with a string ``text``.
    """
    if not file.is_jsonl:
        text = file.path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield Document(file.key, text)
        return
    with open(file.path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file.path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ValueError(f"{file.path}:{lineno}: a JSONL record needs a string field "
                                 f"'text'")
            if rec["text"].strip():
                yield Document(f"{file.key}#{lineno}", rec["text"])


def iter_documents(files: Sequence[CorpusFile]) -> Iterator[Document]:
    """All documents of ``files`` in order."""
    for f in files:
        yield from read_documents(f)


def files_fingerprint(files: Sequence[CorpusFile]) -> str:
    """sha256 over each file's key, size and modification time (cheap; no content read).

    Used to tell whether cached outputs were built from these same inputs.
    """
    h = hashlib.sha256()
    for f in files:
        st = f.path.stat()
        h.update(f"{f.key}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()

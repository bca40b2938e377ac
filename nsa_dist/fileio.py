"""Writes a reader never sees half of: a temporary name beside the target, fsync, then
``os.replace`` (atomic within one file system). On any error the temporary is removed and
the target is left as it was.

- ``AtomicFile(path)``: the primitive; write ``.tmp`` (by name: ``torch.save``, safetensors,
  ``savefig``, a long-lived stream), then ``commit()`` or ``discard()``; also a context manager.
- ``atomic_open(path, mode)``: a file handle (JSON, YAML, CSV writers).
- ``atomic_write(path, data)``: str or bytes in one call.
- ``atomic_dir(path, force)``: a whole output directory (the converters' outputs).

Temporary names start with ``TEMP_PREFIX`` (``is_temp`` tells them apart, e.g. when a
checkpoint lists its files) and end with the target's name, so its extension is kept.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import IO, Iterator, Union

TEMP_PREFIX = ".tmp"


def is_temp(name: str) -> bool:
    """True for a file name this module uses while writing (a leftover of an interrupted write)."""
    return os.path.basename(name).startswith(TEMP_PREFIX)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicFile:
    """A file written under the temporary name ``tmp`` in ``path``'s folder (made if missing).

    ``commit()``: fsync, give it the permissions a plain ``open`` would, rename to ``path``.
    ``discard()``: remove the temporary. As a context manager: commit on success, discard on
    any exception (which propagates).
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = os.path.abspath(os.fspath(path))
        folder, name = os.path.split(self.path)
        os.makedirs(folder, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=f"{TEMP_PREFIX}-", suffix=f"-{name}")
        os.close(fd)

    def commit(self) -> None:
        try:
            _fsync(self.tmp)
            os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from others
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


@contextlib.contextmanager
def atomic_open(path: Union[str, os.PathLike], mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """``open(path, mode)`` whose content appears at ``path`` only when the block succeeds."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes a whole file: mode must start with 'w', got {mode!r}")
    with AtomicFile(path) as f, open(f.tmp, mode, **open_kwargs) as fh:
        yield fh


def atomic_write(path: Union[str, os.PathLike], data: Union[str, bytes]) -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as fh:
        fh.write(data)


@contextlib.contextmanager
def atomic_dir(path: Union[str, os.PathLike], force: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside ``path``; rename it to ``path`` on success.

    An existing ``path`` is refused (FileExistsError) unless ``force``; with ``force`` it is
    replaced only after the new one is complete. On any error the temporary directory is
    removed and ``path`` is untouched.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not force:
        raise FileExistsError(f"output {path} already exists; pass --force to replace it")
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}-", suffix=f"-{name}", dir=parent)
    try:
        yield tmp
        umask = _umask()
        for root, _, files in os.walk(tmp):  # mkdtemp's 0700 would hide the output from others
            os.chmod(root, 0o777 & ~umask)
            for f in files:
                _fsync(os.path.join(root, f))
                os.chmod(os.path.join(root, f), 0o666 & ~umask)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}-old-", suffix=f"-{name}", dir=parent)
            os.replace(path, os.path.join(old, name))
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)

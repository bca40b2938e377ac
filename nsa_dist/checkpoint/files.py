"""A checkpoint folder on disk: file names, the ``latest`` marker, the metadata and its checks.

Both checkpoint kinds share this layout (a DeepSpeed one written by the trainer, a layout-free
one written by ``nsa-convert reshard``)::

    <root>/latest                 the tag of the newest complete checkpoint
    <root>/step_00000050/         one checkpoint ("tag" folder)
        nsa_meta.json             configs, data position and the manifest: every other
                                  file's size ("files") and sha256 ("sha256"); written
                                  last, its presence marks the folder complete

``verify_checkpoint`` checks every listed file against its recorded size and checksum, so a
truncated or damaged file is a clear error naming it rather than a crash deep inside a
loader (or a silent load of flipped bits). Checkpoints written before checksums were
recorded are checked by size alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Optional

META_FILE = "nsa_meta.json"
LATEST_FILE = "latest"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"  # full fp32 (layout-free) or consolidated weights
OPTIMIZER = "optimizer.safetensors"  # Adam moments at full shapes: exp_avg.<name>, exp_avg_sq.<name>
_TAG_RE = re.compile(r"^step_(\d{8,})$")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def read_latest(root: str) -> Optional[str]:
    """The folder ``root/latest`` names, or None without a marker."""
    marker = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(marker):
        return None
    with open(marker) as fh:
        return os.path.join(root, fh.read().strip())


def is_complete(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(tag_dir, META_FILE))


def read_meta(tag_dir: str) -> dict:
    """The metadata of a checkpoint folder; FileNotFoundError/ValueError when unusable."""
    path = os.path.join(tag_dir, META_FILE)
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"checkpoint folder not found: {tag_dir}")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {tag_dir} is incomplete (no {META_FILE}): its save was "
                         f"interrupted; resume from an earlier one or use --resume auto")
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint metadata {path} is corrupt ({err})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r}, expected "
                         f"{FORMAT_VERSION}")
    return meta


def file_sizes(tag_dir: str, skip=lambda name: False) -> dict[str, int]:
    """Relative path -> size of every file under ``tag_dir`` but the metadata and ``skip``ped
    names, sorted: the ``files`` entry of the metadata."""
    files = {}
    for dirpath, _, names in os.walk(tag_dir):
        for name in names:
            if name == META_FILE or skip(name):
                continue
            full = os.path.join(dirpath, name)
            files[os.path.relpath(full, tag_dir)] = os.path.getsize(full)
    return dict(sorted(files.items()))


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def manifest(tag_dir: str, skip=lambda name: False) -> dict:
    """The manifest fields of a checkpoint's metadata: ``files`` (relative path -> size) and
    ``sha256`` (relative path -> hex digest) of every file but the metadata and ``skip``ped names."""
    files = file_sizes(tag_dir, skip)
    return {"files": files, "sha256": {name: sha256_file(os.path.join(tag_dir, name)) for name in files}}


def verify_checkpoint(tag_dir: str, checksums: bool = True) -> dict:
    """Metadata of ``tag_dir`` after checking every listed file exists with its size and (with
    ``checksums``, where recorded) its sha256. FileNotFoundError / ValueError naming the file."""
    meta = read_meta(tag_dir)
    for name, size in meta["files"].items():
        path = os.path.join(tag_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {tag_dir} is missing {name}; it cannot be "
                                    f"loaded (resume from an earlier checkpoint)")
        have = os.path.getsize(path)
        if have != size:
            raise ValueError(f"checkpoint {tag_dir} is truncated or damaged: {name} has {have} "
                             f"bytes, the save wrote {size}; resume from an earlier checkpoint")
    for name, digest in (meta.get("sha256") or {}).items() if checksums else ():
        if sha256_file(os.path.join(tag_dir, name)) != digest:
            raise ValueError(f"checkpoint {tag_dir} is damaged: {name} fails its sha256 check (its "
                             f"bytes changed after the save); resume from an earlier checkpoint")
    return meta


def list_checkpoints(root: str) -> list[str]:
    """Tag folders under ``root`` (complete or not), oldest first."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if _TAG_RE.match(t) and os.path.isdir(os.path.join(root, t))]
    return [os.path.join(root, t) for t in sorted(tags, key=lambda t: int(_TAG_RE.match(t).group(1)))]


def find_tag_dir(path: str) -> str:
    """The checkpoint folder ``path`` means: itself, or what ``latest`` names in it or in its
    ``checkpoints`` subfolder (a run directory). FileNotFoundError when none."""
    for root in (path, os.path.join(path, "checkpoints")):
        if is_complete(root):
            return root
        latest = read_latest(root)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"{path}: no nsa_dist checkpoint (no {META_FILE}, no '{LATEST_FILE}' marker)")

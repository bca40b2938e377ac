"""Safe checkpoint I/O: safetensors loads and the consolidated format; progress display."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Iterable, Iterator, Optional

import torch

from ..checkpoint.files import OPTIMIZER, WEIGHTS
from ..checkpoint.tensors import load_safetensors_file
from ..config import ModelConfig

CONFIG = "config.json"


def progress(items: Iterable, desc: str, quiet: bool = False, total: Optional[int] = None) -> Iterable:
    """``items`` with a progress display on stderr: a tqdm bar when tqdm is installed, else a
    line every 2 s. The plain iterable when ``quiet`` or when stderr is not a terminal (logs)."""
    if quiet or not sys.stderr.isatty():
        return items
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    try:
        from tqdm import tqdm
    except ImportError:
        return _progress_lines(items, desc, total)
    return tqdm(items, desc=f"[nsa-convert] {desc}", total=total, file=sys.stderr, leave=False)


def _progress_lines(items: Iterable, desc: str, total: Optional[int]) -> Iterator:
    last = 0.0
    for i, item in enumerate(items):
        if time.monotonic() - last > 2.0:
            last = time.monotonic()
            print(f"[nsa-convert] {desc}: {i}/{total if total is not None else '?'}", file=sys.stderr, flush=True)
        yield item
    print(f"[nsa-convert] {desc}: done", file=sys.stderr, flush=True)


def note(msg: str, quiet: bool = False) -> None:
    """One status line on stderr (a terminal only, like ``progress``): e.g. before a long write."""
    if not quiet and sys.stderr.isatty():
        print(f"[nsa-convert] {msg}", file=sys.stderr, flush=True)


def load_safetensors_dir(path: str, skip: tuple[str, ...] = (), quiet: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of the ``*.safetensors`` files in ``path`` (sharded or not), but ``skip``."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and f not in skip)
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for name in progress(files, f"reading {os.path.basename(os.path.abspath(path))}", quiet):
        part = load_safetensors_file(os.path.join(path, name))
        dup = state.keys() & part.keys()
        if dup:
            raise ValueError(f"tensor {sorted(dup)[0]} appears in more than one file of {path}")
        state.update(part)
    return state


def save_consolidated(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str,
                      extra: dict | None = None) -> None:
    """Write ``model.safetensors`` + ``config.json`` (our ModelConfig) into ``out_dir``."""
    from safetensors.torch import save_file

    seen: dict[int, str] = {}
    clean = {}
    for name, t in state.items():
        if t.data_ptr() in seen and t.numel():  # tied weights are stored once
            continue
        seen[t.data_ptr()] = name
        clean[name] = t.detach().contiguous().cpu()
    save_file(clean, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt", "producer": "nsa_dist"})
    with open(os.path.join(out_dir, CONFIG), "w") as fh:
        json.dump({"nsa_dist_model": cfg.to_dict(), **(extra or {})}, fh, indent=2)


def read_config_json(path: str) -> dict:
    """The ``config.json`` of a consolidated directory (ours: it has ``nsa_dist_model``)."""
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} has no {CONFIG}: not a consolidated nsa_dist checkpoint")
    try:
        with open(cfg_path) as fh:
            meta = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path} is not valid JSON (truncated?): {err}") from None
    if "nsa_dist_model" not in meta:
        raise ValueError(f"{cfg_path} is not an nsa_dist config (no 'nsa_dist_model' key)")
    return meta


def load_consolidated_config(path: str) -> ModelConfig:
    """The model config of a directory written by ``save_consolidated``."""
    meta = read_config_json(path)
    return ModelConfig.from_dict(meta["nsa_dist_model"], where=os.path.join(path, CONFIG))


def load_weights_dir(path: str, quiet: bool = True) -> dict[str, torch.Tensor]:
    """The model weights of a folder of ``*.safetensors`` files: a consolidated directory, a
    layout-free checkpoint folder or plain shards. ``optimizer.safetensors`` (Adam's moments,
    written by ``consolidate --optimizer`` and ``reshard``) is never read as weights."""
    return load_safetensors_dir(path, skip=(OPTIMIZER,), quiet=quiet)


def load_consolidated(path: str, quiet: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a directory written by ``save_consolidated`` (the weights; not the optimizer file)."""
    return load_consolidated_config(path), load_weights_dir(path, quiet=quiet)

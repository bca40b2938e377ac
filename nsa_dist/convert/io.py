"""Safe checkpoint I/O: safetensors or weights-only loads, atomic output directories."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator

import torch

from ..config import ModelConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@contextlib.contextmanager
def atomic_output_dir(path: str, force: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside ``path``; rename it to ``path`` on success.

    An existing ``path`` is refused unless ``force``; with ``force`` it is replaced only
    after the new one is complete. On any error the temporary directory is removed and
    ``path`` is untouched.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not force:
        raise FileExistsError(f"output {path} already exists; pass --force to replace it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp", dir=parent)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for root, dirs, files in os.walk(tmp):  # mkdtemp's 0700 would hide the output from others
            os.chmod(root, 0o777 & ~umask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~umask)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old", dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def load_safetensors_dir(path: str) -> dict[str, torch.Tensor]:
    """All tensors of the ``*.safetensors`` files in ``path`` (sharded or not)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            part = load_file(os.path.join(path, name))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"cannot read {os.path.join(path, name)} (truncated or not safetensors?): {err}") from err
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


def load_consolidated(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a directory written by ``save_consolidated``."""
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} has no {CONFIG}: not a consolidated nsa_dist checkpoint")
    with open(cfg_path) as fh:
        meta = json.load(fh)
    if "nsa_dist_model" not in meta:
        raise ValueError(f"{cfg_path} is not an nsa_dist config (no 'nsa_dist_model' key)")
    return ModelConfig.from_dict(meta["nsa_dist_model"], where=cfg_path), load_safetensors_dir(path)

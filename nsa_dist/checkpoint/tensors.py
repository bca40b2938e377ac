"""Tensor files read without running foreign code, and the Adam-moments file.

``torch.load`` always runs with ``weights_only=True`` (``load_allowlisted`` names the few
non-tensor classes a caller admits); safetensors files hold tensors only.
"""
from __future__ import annotations

import importlib
from typing import Callable, Iterable, Optional

import torch


def load_allowlisted(path: str, allow: Callable[[str], bool], extra: tuple = (),
                     stand_ins: Optional[dict[str, Callable]] = None):
    """``torch.load(path, weights_only=True)`` admitting the non-tensor classes whose dotted
    names ``allow`` accepts (plus the classes in ``extra``); ValueError naming the file when it
    is unreadable or holds any other class. ``stand_ins``: dotted name -> a class built in its
    place, so its package (e.g. DeepSpeed, whose import probes the accelerator) is not imported."""
    try:
        unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as err:  # truncated zip, not a torch file
        raise ValueError(f"cannot read {path} (truncated or not a torch file?): {err}") from err
    foreign = [n for n in unsafe if not allow(n)]
    if foreign:
        raise ValueError(f"{path} holds objects of {foreign}: refusing to unpickle them "
                         f"(not a checkpoint written by nsa_dist / DeepSpeed?)")
    stand_ins = stand_ins or {}
    classes = [(stand_ins[n], n) if n in stand_ins else
               getattr(importlib.import_module(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in unsafe]
    try:
        with torch.serialization.safe_globals(classes + list(extra)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read {path} (truncated or damaged?): {err}") from err


def load_safetensors_file(path: str) -> dict[str, torch.Tensor]:
    """One safetensors file; ValueError naming it when truncated or not safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"cannot read {path} (truncated or not safetensors?): {err}") from err


def save_moments(exp_avg: dict[str, torch.Tensor], exp_avg_sq: dict[str, torch.Tensor], names: Iterable[str],
                 path: str) -> None:
    """Adam's moments of the parameters ``names`` (full shapes, fp32) into one safetensors file."""
    from safetensors.torch import save_file

    names = list(names)
    save_file({**{f"exp_avg.{k}": exp_avg[k].detach().float().contiguous() for k in names},
               **{f"exp_avg_sq.{k}": exp_avg_sq[k].detach().float().contiguous() for k in names}},
              path, metadata={"producer": "nsa_dist"})


def load_moments(path: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(exp_avg, exp_avg_sq) by parameter name from a file written by ``save_moments``."""
    state = load_safetensors_file(path)
    avg = {k[len("exp_avg."):]: v for k, v in state.items() if k.startswith("exp_avg.")}
    avg_sq = {k[len("exp_avg_sq."):]: v for k, v in state.items() if k.startswith("exp_avg_sq.")}
    if set(avg) != set(avg_sq) or len(avg) + len(avg_sq) != len(state):
        raise ValueError(f"{path}: not an Adam moments file (expected exp_avg.<name> and exp_avg_sq.<name> pairs)")
    return avg, avg_sq

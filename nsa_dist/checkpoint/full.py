"""The layout-free checkpoint (``nsa-convert reshard`` writes it, ``nsa-pretrain --resume``
loads it on any TP / Ulysses / DP layout and ZeRO stage)::

    <root>/latest                          -> step_XXXXXXXX
    <root>/step_XXXXXXXX/model.safetensors       fp32 weights at single-device names and shapes
    <root>/step_XXXXXXXX/optimizer.safetensors   exp_avg.<name>, exp_avg_sq.<name> (fp32), unless reset
    <root>/step_XXXXXXXX/nsa_meta.json           configs, data position, global batch, "layout": "full",
                                                 "optimizer": "adam" | "reset", file sizes and sha256

Adam's moments are elementwise per parameter, so a rank cuts them for its layout exactly like
the weights (``layout.local_slices``).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from .files import FORMAT_VERSION, LATEST_FILE, META_FILE, OPTIMIZER, WEIGHTS, manifest, tag_for_step
from .layout import local_slices
from .tensors import load_moments, load_safetensors_file, save_moments

# What of a source checkpoint's metadata belongs to its layout, not to a layout-free copy.
_LAYOUT_KEYS = ("param_layout", "world_size", "files", "sha256", "format_version", "deepspeed_config", "tag")


def write_full(root: str, step: int, params: dict[str, torch.Tensor], names: list[str],
               moments: Optional[tuple[dict, dict]], meta: dict, **extra) -> str:
    """Write a layout-free checkpoint of ``step`` under ``root`` (a new folder the caller
    renames into place: see ``fileio.atomic_dir``); returns its tag folder.

    params: full tensors by name; names: the parameters to store (a tied lm_head left out);
    moments: (exp_avg, exp_avg_sq) at the same names, or None (the optimizer is reset); meta:
    the source's metadata (its layout keys are dropped); extra: more metadata fields.
    """
    from safetensors.torch import save_file

    tag = tag_for_step(step)
    tag_dir = os.path.join(root, tag)
    os.makedirs(tag_dir)
    save_file({k: params[k].detach().float().contiguous() for k in names}, os.path.join(tag_dir, WEIGHTS),
              metadata={"producer": "nsa_dist reshard"})
    if moments is not None:
        save_moments(moments[0], moments[1], names, os.path.join(tag_dir, OPTIMIZER))
    record = {k: v for k, v in meta.items() if k not in _LAYOUT_KEYS}
    record.update(format_version=FORMAT_VERSION, tag=tag, step=step, layout="full",
                  optimizer="reset" if moments is None else "adam", **extra, **manifest(tag_dir))
    with open(os.path.join(tag_dir, META_FILE), "w") as fh:
        json.dump(record, fh, indent=2)
    with open(os.path.join(root, LATEST_FILE), "w") as fh:
        fh.write(tag + "\n")
    return tag_dir


def load_full(tag_dir: str) -> tuple[dict[str, torch.Tensor], Optional[dict[str, torch.Tensor]],
                                     Optional[dict[str, torch.Tensor]]]:
    """(weights, exp_avg, exp_avg_sq) of a layout-free checkpoint folder (moments None when reset)."""
    weights = load_safetensors_file(os.path.join(tag_dir, WEIGHTS))
    if not os.path.isfile(os.path.join(tag_dir, OPTIMIZER)):
        return weights, None, None
    avg, avg_sq = load_moments(os.path.join(tag_dir, OPTIMIZER))
    return weights, avg, avg_sq


def load_weights(model: nn.Module, tag_dir: str, tied: bool) -> None:
    """Copy the checkpoint's weights, cut for this rank, into ``model`` (a single-device or
    parallelised model, before DeepSpeed wraps it)."""
    weights, _, _ = load_full(tag_dir)
    with torch.no_grad():
        for p, t in local_slices(model, weights, tied, tag_dir):
            p.copy_(t)

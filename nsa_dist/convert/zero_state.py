"""Full fp32 weights and Adam states of one model-parallel (TP) rank from DeepSpeed's ZeRO files.

DeepSpeed keeps, per data-parallel rank, flat fp32 partitions of each optimizer param group:

- ZeRO 1/2 (``zero_pp_rank_D_mp_rank_TT_optim_states.pt``): the group's flat vector is cut into
  contiguous pieces, one per DP rank; concatenated in rank order they hold the parameters of
  ``param_shapes`` (from ``mp_rank_TT_model_states.pt``) back to back, with the recorded
  ``param_alignment_paddings`` between them.
- ZeRO 3 (``fp32_flat_groups``): every parameter is split into ``ceil(numel / dp)`` pieces, one
  per rank; a rank's groups, concatenated, hold its piece of each parameter in order.

Adam's ``exp_avg`` / ``exp_avg_sq`` of a group are flat vectors laid out exactly like the fp32
group, so they unflatten the same way. Files are read with ``torch.load(weights_only=True)``;
the only non-tensor classes allowed are three small DeepSpeed records (a loss-scaler, an enum
and a field pair) listed in ``_DS_GLOBALS``, built from stand-ins so that DeepSpeed itself is
never imported; anything else in a file is refused.
"""
from __future__ import annotations

import enum
import glob
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..checkpoint.tensors import load_allowlisted
from .io import progress

class _Record:
    """Stands in for a small DeepSpeed record class: the unpickler sets its fields."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


class _ZeroStageEnum(enum.IntEnum):  # deepspeed.runtime.zero.config.ZeroStageEnum's values
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


# Built from stand-ins, so reading a checkpoint never imports DeepSpeed (whose import probes
# the accelerator and prints about it); consolidation reads none of their fields.
_DS_GLOBALS = {"deepspeed.runtime.fp16.loss_scaler.LossScaler": _Record,
               "deepspeed.utils.tensor_fragment.fragment_address": _Record,
               "deepspeed.runtime.zero.config.ZeroStageEnum": _ZeroStageEnum}


def load_ds_file(path: str) -> dict:
    """A DeepSpeed checkpoint file through ``weights_only=True`` (ValueError when unreadable or
    when it holds classes outside ``_DS_GLOBALS``). For reading: its DeepSpeed records come back
    as stand-ins, so a ``torch.save`` of the result is not a file for DeepSpeed's own loader."""
    return load_allowlisted(path, lambda n: n in _DS_GLOBALS, stand_ins=_DS_GLOBALS)


@dataclass
class RankState:
    """One TP rank's parameters at their (TP-local) names: fp32 weights and, when the
    checkpoint has them, Adam's moments and step."""
    params: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor] = field(default_factory=dict)
    exp_avg_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    step: Optional[int] = None


def _dp_files(tag_dir: str, tp_rank: int, kind: str) -> list[str]:
    pat = re.compile(rf"zero_pp_rank_(\d+)_mp_rank_{tp_rank:02d}_{kind}\.pt$")
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(tag_dir, f"zero_pp_rank_*_mp_rank_{tp_rank:02d}_{kind}.pt"))
             if (m := pat.search(p))]
    ranks = sorted(r for r, _ in found)
    if ranks != list(range(len(ranks))):
        raise ValueError(f"{tag_dir}: ZeRO {kind} files of TP rank {tp_rank} are for DP ranks {ranks}; "
                         "some are missing")
    return [p for _, p in sorted(found)]


def _unflatten_z12(flats: list[torch.Tensor], shapes: dict, paddings: Optional[list[int]], dp: int,
                   where: str) -> dict[str, torch.Tensor]:
    full = torch.cat(flats)
    out, offset = {}, 0
    for i, (name, shape) in enumerate(shapes.items()):
        n = math.prod(shape)
        out[name] = full.narrow(0, offset, n).view(tuple(shape)).clone()
        offset += n + (paddings[i] if paddings else 0)
    align = 2 * dp  # ZeRO-2 pads each group to a multiple of 2 x dp (see DeepSpeed's zero_to_fp32)
    if align * math.ceil(offset / align) != align * math.ceil(full.numel() / align):
        raise ValueError(f"{where}: the parameters take {offset} of {full.numel()} values: the shapes do "
                         "not match the optimizer shards")
    return out


def _unflatten_z3(per_rank: list[torch.Tensor], shapes: dict, where: str) -> dict[str, torch.Tensor]:
    dp = len(per_rank)
    out, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        part = math.ceil(n / dp)
        pieces = [r[offset:offset + part] for r in per_rank]
        if any(p.numel() != part for p in pieces):
            raise ValueError(f"{where}: the optimizer shards end inside {name}")
        out[name] = torch.cat(pieces)[:n].view(tuple(shape)).clone()
        offset += part
    if offset != per_rank[0].numel():
        raise ValueError(f"{where}: the parameters take {offset} of {per_rank[0].numel()} values per rank")
    return out


def read_tp_rank(tag_dir: str, tp_rank: int, stage: int, optimizer: bool = True,
                 quiet: bool = True) -> RankState:
    """Reassemble TP rank ``tp_rank`` of a ZeRO ``stage`` (1-3) checkpoint folder: its fp32
    weights (and Adam's moments) at TP-local names and shapes, from all DP ranks' shards."""
    where = f"{tag_dir} (TP rank {tp_rank})"
    optim_files = _dp_files(tag_dir, tp_rank, "optim_states")
    if not optim_files:
        raise FileNotFoundError(f"{where}: no ZeRO optimizer files (zero_pp_rank_*_mp_rank_{tp_rank:02d}_optim_states.pt)")
    model_file = (_dp_files(tag_dir, tp_rank, "model_states")[0] if stage == 3
                  else os.path.join(tag_dir, f"mp_rank_{tp_rank:02d}_model_states.pt"))
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"{where}: {model_file} is missing")
    model_sd = load_ds_file(model_file)
    groups = model_sd["param_shapes"]  # list (one per param group) of name -> shape
    dp = len(optim_files)
    flats, avg, avg_sq, step = [], [], [], None
    for f in progress(optim_files, f"TP rank {tp_rank}: reading {dp} ZeRO shard file(s)", quiet):
        osd = load_ds_file(f)["optimizer_state_dict"]
        count = osd["partition_count"]
        count = max(count) if isinstance(count, list) else count
        if count != dp:
            raise ValueError(f"{where}: the shards say {count} data-parallel ranks, {dp} files exist")
        if stage == 3:
            flats.append(list(osd["fp32_flat_groups"]))
            states = osd["optimizer_state_dict"]["state"]
        else:
            flats.append(list(osd["single_partition_of_fp32_groups"]))
            states = osd["base_optimizer_state"]["state"]
        if optimizer:
            keys = sorted(states)
            if not keys or any(k not in states[g] for g in keys for k in ("exp_avg", "exp_avg_sq")):
                raise ValueError(f"{where}: the optimizer state has no Adam moments; pass "
                                 "--reset-optimizer to reshard the weights alone")
            avg.append([states[g]["exp_avg"] for g in keys])
            avg_sq.append([states[g]["exp_avg_sq"] for g in keys])
            step = int(float(states[keys[0]]["step"]))
        paddings = osd.get("param_alignment_paddings")
    if len(flats[0]) != len(groups):
        raise ValueError(f"{where}: {len(groups)} parameter groups in the model file, {len(flats[0])} in the shards")

    def unflatten(per_rank_groups: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        if stage == 3:
            merged = {k: v for g in groups for k, v in g.items()}
            return _unflatten_z3([torch.cat(r) for r in per_rank_groups], merged, where)
        out = {}
        for g, shapes in enumerate(groups):
            out.update(_unflatten_z12([r[g] for r in per_rank_groups], shapes,
                                      paddings[g] if paddings else None, dp, where))
        return out

    state = RankState(unflatten(flats))
    if optimizer:
        state.exp_avg, state.exp_avg_sq, state.step = unflatten(avg), unflatten(avg_sq), step
    for alias, target in model_sd.get("shared_params", {}).items():  # tied weights
        for d in (state.params, state.exp_avg, state.exp_avg_sq):
            if target in d:
                d[alias] = d[target]
    return state

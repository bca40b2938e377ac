"""The layout record: which slice of which single-device parameter each parameter of a rank
holds, named and ordered as that rank's optimizer holds them.

A record (one per TP rank, ``param_layout`` in a DeepSpeed checkpoint's metadata) maps
local name -> [full name, dim, start, stop] (dim None: the whole tensor). ``consolidate``
joins the ranks' tensors through it and the layout-free resume cuts full tensors with it, so
both read local names only through the record.

Order matters on resume: ZeRO 1-2 keep one flat fp32 buffer per parameter group and a plain
torch optimizer keys its state by position, both in the order the parameters were handed to
the optimizer; another order silently gives each parameter another's weights and Adam state.
The trainer therefore hands them over in the record's order (each group a stable subset of
it) and records them in the order the optimizer uses. Records written before the parallel
model kept the single-device names hold the parallel classes' names (``layers.0.attn.q_proj``
for ``layers.0.attn.q_proj.weight``) in their registration order; ``renames`` matches them to
the live model by (full name, slice).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional

import torch
from torch import nn


def _first_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> the first name it is registered under (a tied weight has two)."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    return names


def local_layout(model: nn.Module, params: Optional[Iterable[nn.Parameter]] = None) -> dict[str, list]:
    """This rank's record: local name -> [full name, dim, start, stop] (dim None: whole).

    params: the optimizer's parameters in its order (the record's order); by default the
    model's registration order. Parameters of the model not among them follow at the end.
    """
    names = _first_names(model)
    order = list(params) if params is not None else []
    order += [p for _, p in model.named_parameters()]
    out = {}
    for p in order:
        name = names[id(p)]
        if name in out:
            continue
        shard = getattr(p, "nsa_shard", None)
        out[name] = [name] + (list(shard) if shard else [None, None, None])
    return out


def renames(record: dict[str, list], live: dict[str, list], where: str = "checkpoint") -> dict[str, str]:
    """Local name in ``record`` -> local name in ``live`` (both records of one rank), matched
    on (full name, dim, start, stop). ValueError naming the first parameter either side lacks."""
    by_slice = {tuple(entry): name for name, entry in live.items()}
    out = {}
    for name, entry in record.items():
        if tuple(entry) not in by_slice:
            raise ValueError(f"{where}: its parameter {name} (slice {entry} of the full model) has no "
                             f"counterpart in this model; was it written by another model or layout?")
        out[name] = by_slice[tuple(entry)]
    missing = sorted(set(live) - set(out.values()))
    if missing:
        raise ValueError(f"{where}: this model's parameters {missing[:5]} are not in the checkpoint's "
                         "param_layout; was it written by another model or layout?")
    return out


def ordered_parameters(model: nn.Module, record: Optional[dict[str, list]] = None,
                       where: str = "checkpoint") -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of ``model``, each once: in ``record``'s order (a checkpoint's record of
    this rank, its names matched by ``renames``), else in registration order."""
    params = dict(model.named_parameters())
    if record is None:
        return list(params.items())
    mapping = renames(record, local_layout(model), where)
    return [(mapping[name], params[mapping[name]]) for name in record]


def rename_state_dict(state: dict[str, torch.Tensor], mapping: dict[str, str],
                      model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` (a module state dict at a checkpoint's local names) at ``model``'s names;
    a tied weight's second name, absent from a record, gets the first name's tensor."""
    out = {mapping.get(k, k): v for k, v in state.items()}
    aliases = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[id(p)].append(name)
    for names in aliases.values():
        have = [n for n in names if n in out]
        for n in names:
            if have and n not in out:
                out[n] = out[have[0]]
    return out


def local_slices(model: nn.Module, full: dict[str, torch.Tensor], tied: bool, where: str) -> list:
    """(local parameter, its slice of ``full[name]``) for every parameter of ``model``: full
    (single-device) tensors cut for this rank through its record."""
    params = dict(model.named_parameters())
    out = []
    for local, (name, dim, start, stop) in local_layout(model).items():
        if name not in full and name == "lm_head.weight" and tied:
            name = "embed.weight"
        if name not in full:
            raise ValueError(f"{where}: no tensor for parameter {name}")
        t = full[name]
        if dim is not None:
            t = t.narrow(dim, start, stop - start)
        p = params[local]
        shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions: the full local shape
        if tuple(t.shape) != shape:
            raise ValueError(f"{where}: {name} gives {tuple(t.shape)} for this layout, the model holds {shape}")
        out.append((p, t))
    return out

"""Tensor-parallel sharding of a model's own layers, in place: column- and row-parallel
linears, the vocab-parallel embedding lookup.

A plan replaces a parameter by the slice this rank holds (``shard_param``), under the same
name, so a model initialised from a seed on one device and then sharded is the same model and
its checkpoint names are the single-device names. Each parameter carries
``nsa_shard = (dim, start, stop)`` (the slice of the full tensor it holds; ``None`` when
replicated) and ``nsa_full_shape`` so that gradients and weights can be gathered back to
full shape (``parallelize.gather_full``, the checkpoint layout record), and
``tensor_model_parallel`` (True when this rank's copy is distinct from every other TP
rank's), which DeepSpeed's gradient-norm code reads.

Where the activations enter and leave a sharded region is the business of the layer's hooks
(``hooks.py``). Activations are ``[B, S, hidden]``; the sequence dimension (Megatron SP) is 1.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import collectives as C
from .comm_stats import Meter

SEQ_DIM = 1


def shard_param(full: torch.Tensor, dim: Optional[int], start: int = 0, stop: int = 0) -> nn.Parameter:
    """A new Parameter holding ``full[start:stop]`` along ``dim`` (a copy; replicated if dim is None)."""
    data = full.detach().clone() if dim is None else full.detach().narrow(dim, start, stop - start).clone()
    p = nn.Parameter(data, requires_grad=full.requires_grad)
    p.nsa_shard = None if dim is None else (dim, start, stop)
    p.nsa_full_shape = tuple(getattr(full, "nsa_full_shape", full.shape))
    # DeepSpeed (and Megatron) count a parameter in the global gradient norm on every TP rank
    # when this is set, otherwise on TP rank 0 only (a replica).
    p.tensor_model_parallel = dim is not None
    return p


def shard_(module: nn.Module, name: str, dim: Optional[int] = None, start: int = 0, stop: int = 0) -> nn.Parameter:
    """Replace ``module.<name>`` by its slice [start, stop) along ``dim`` (None: a replica),
    keeping its name and place among the module's parameters. Returns the new parameter."""
    p = shard_param(getattr(module, name), dim, start, stop)
    setattr(module, name, p)
    return p


def shard_columnwise_(linear: nn.Linear, start: int, stop: int) -> nn.Linear:
    """Column-parallel: this rank computes output features [start, stop) (weight rows, bias)."""
    shard_(linear, "weight", 0, start, stop)
    if linear.bias is not None:
        shard_(linear, "bias", 0, start, stop)
    linear.out_features = stop - start
    return linear


def shard_rowwise_(linear: nn.Linear, start: int, stop: int) -> nn.Linear:
    """Row-parallel: this rank takes input features [start, stop) (weight columns); the
    partial outputs are summed by the region's exit hook, so there is no bias to add once."""
    if linear.bias is not None:
        raise ValueError("a row-parallel linear with a bias is not supported (the bias would be "
                         "added on every rank before the sum)")
    shard_(linear, "weight", 1, start, stop)
    linear.in_features = stop - start
    return linear


def replicate_(module: nn.Module) -> nn.Module:
    """Every parameter of ``module`` not yet sharded becomes a marked replica."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if not hasattr(p, "nsa_shard"):
                shard_(sub, name)
    return module


def vocab_parallel_embedding(ids: torch.Tensor, weight: torch.Tensor, vocab_start: int, group,
                             output_mode: str = "reduce", meter: Optional[Meter] = None) -> torch.Tensor:
    """Lookup in embedding rows [vocab_start, vocab_start + V_local) held here: ids outside give
    zeros and the partial lookups are summed over ``group`` (all-reduce, or reduce-scatter
    along the sequence for Megatron SP). ids [B, S] -> [B, S(/t), hidden]."""
    if output_mode not in ("reduce", "reduce_scatter_seq"):
        raise ValueError(f"output_mode must be 'reduce' or 'reduce_scatter_seq', got {output_mode!r}")
    outside = (ids < vocab_start) | (ids >= vocab_start + weight.shape[0])
    local = (ids - vocab_start).masked_fill(outside, 0)
    e = nn.functional.embedding(local, weight).masked_fill(outside[..., None], 0.0)
    if output_mode == "reduce":
        return C.reduce_from_region(e, group, meter)
    return C.reduce_scatter_along(e, SEQ_DIM, group, meter)

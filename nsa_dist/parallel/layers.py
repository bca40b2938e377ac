"""Tensor-parallel layers: column- and row-parallel linear, vocab-parallel embedding.

Layers are built from the full single-device module (``from_linear`` / ``from_embedding``)
by slicing its weights, so a model initialised from a seed on one device and then
parallelised is the same model. Each parameter carries ``nsa_shard = (dim, start, stop)``
(the slice of the full tensor it holds; ``None`` when replicated) so that gradients and
weights can be gathered back to full shape (``parallelize.gather_full``), and
``tensor_model_parallel`` (True when this rank's copy is distinct from every other TP
rank's), which DeepSpeed's gradient-norm code reads.

Activations are ``[B, S, hidden]``; the sequence dimension (Megatron SP) is 1.
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
    # DeepSpeed (and Megatron) count a parameter in the global gradient norm on every TP rank
    # when this is set, otherwise on TP rank 0 only (a replica).
    p.tensor_model_parallel = dim is not None
    return p


class ColumnParallelLinear(nn.Module):
    """y_local = x W[rows]^T (+ b[rows]): output features split over the TP group.

    input_mode: "copy" (x replicated over TP: identity forward, all-reduce of dx backward),
    "gather_seq" (Megatron SP: x is [B, S/t, in], all-gathered along the sequence, dx
    reduce-scattered) or "none" (the caller entered the region once for several layers).
    x: [B, S(/t), in] -> [B, S, out_local].
    """

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], group,
                 input_mode: str = "copy", meter: Optional[Meter] = None):
        super().__init__()
        if input_mode not in ("copy", "gather_seq", "none"):
            raise ValueError(f"input_mode must be 'copy', 'gather_seq' or 'none', got {input_mode!r}")
        self.weight, self.bias = weight, bias
        self.group, self.input_mode, self.meter = group, input_mode, meter

    @classmethod
    def from_linear(cls, linear: nn.Linear, start: int, stop: int, group, **kw) -> "ColumnParallelLinear":
        """Rows [start, stop) of ``linear`` (its output features)."""
        b = None if linear.bias is None else shard_param(linear.bias, 0, start, stop)
        return cls(shard_param(linear.weight, 0, start, stop), b, group, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_mode == "copy":
            x = C.copy_to_region(x, self.group, self.meter)
        elif self.input_mode == "gather_seq":
            x = C.gather_along(x, SEQ_DIM, self.group, self.meter)
        return nn.functional.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_local W[:, cols]^T (+ b once): input features split over TP.

    output_mode: "reduce" (all-reduce; y replicated), "reduce_scatter_seq" (Megatron SP:
    y is [B, S/t, out]) or "none" (partial sums left to the caller).
    x: [B, S, in_local] -> [B, S(/t), out].
    """

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], group,
                 output_mode: str = "reduce", meter: Optional[Meter] = None):
        super().__init__()
        if output_mode not in ("reduce", "reduce_scatter_seq", "none"):
            raise ValueError(f"output_mode must be 'reduce', 'reduce_scatter_seq' or 'none', "
                             f"got {output_mode!r}")
        self.weight, self.bias = weight, bias
        self.group, self.output_mode, self.meter = group, output_mode, meter

    @classmethod
    def from_linear(cls, linear: nn.Linear, start: int, stop: int, group, **kw) -> "RowParallelLinear":
        """Columns [start, stop) of ``linear`` (its input features); the bias is replicated."""
        b = None if linear.bias is None else shard_param(linear.bias, None)
        return cls(shard_param(linear.weight, 1, start, stop), b, group, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight)
        if self.output_mode == "reduce":
            y = C.reduce_from_region(y, self.group, self.meter)
        elif self.output_mode == "reduce_scatter_seq":
            y = C.reduce_scatter_along(y, SEQ_DIM, self.group, self.meter)
        if self.bias is not None:
            # Added after the reduction so it counts once; its gradient is complete on every rank.
            y = y + self.bias
        return y


class VocabParallelEmbedding(nn.Module):
    """Embedding rows [vocab_start, vocab_end) on this rank; ids outside give zeros and the
    partial lookups are summed over TP (all-reduce, or reduce-scatter along the sequence
    with Megatron SP). ids [B, S] -> [B, S(/t), hidden]."""

    def __init__(self, weight: nn.Parameter, vocab_start: int, group,
                 output_mode: str = "reduce", meter: Optional[Meter] = None):
        super().__init__()
        if output_mode not in ("reduce", "reduce_scatter_seq"):
            raise ValueError(f"output_mode must be 'reduce' or 'reduce_scatter_seq', got {output_mode!r}")
        self.weight, self.vocab_start = weight, vocab_start
        self.vocab_end = vocab_start + weight.shape[0]
        self.group, self.output_mode, self.meter = group, output_mode, meter

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, tp_rank: int, tp: int, group, **kw) -> "VocabParallelEmbedding":
        V = emb.weight.shape[0]
        if V % tp:
            raise ValueError(f"vocab_size={V} is not divisible by tp={tp}; pad it to {-(-V // tp) * tp}")
        per = V // tp
        return cls(shard_param(emb.weight, 0, tp_rank * per, (tp_rank + 1) * per),
                   tp_rank * per, group, **kw)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        e = nn.functional.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)
        if self.output_mode == "reduce":
            return C.reduce_from_region(e, self.group, self.meter)
        return C.reduce_scatter_along(e, SEQ_DIM, self.group, self.meter)

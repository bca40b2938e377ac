"""Autograd-aware collectives, each with an explicit process group.

Every function takes ``group`` (a ``torch.distributed`` process group; ``None`` means a
group of one rank, i.e. a no-op, never the world) and an optional ``Meter`` that records
bytes per call in forward and backward (comm_stats.py).

Pairs (forward / backward), after Megatron's mappings:
- ``copy_to_region``: identity / all-reduce (enter a TP region; also the gradient
  reduction of a replicated parameter whose uses are split over ranks).
- ``reduce_from_region``: all-reduce / identity (leave a TP region).
- ``gather_along``: all-gather along a dim / reduce-scatter (Megatron SP before a
  column-parallel layer).
- ``reduce_scatter_along``: reduce-scatter / all-gather (Megatron SP after row-parallel).
- ``split_along``: keep this rank's chunk / all-gather (shard an input).
- ``gather_no_reduce``: all-gather / keep this rank's chunk of the gradient (outputs whose
  gradient is the same on every rank).
- ``all_to_all``: all-to-all / the reverse all-to-all (Ulysses).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .comm_stats import Meter


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _record(meter: Optional[Meter], op: str, phase: str, t: torch.Tensor, p: int) -> None:
    if meter is not None:
        meter(op, phase, t, p)


# ----------------------------------------------------------------------------- raw ops
def all_reduce_(x: torch.Tensor, group, meter: Optional[Meter] = None, phase: str = "fwd",
                op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce (no autograd); returns x."""
    p = group_size(group)
    if p > 1:
        _record(meter, "all_reduce", phase, x, p)
        dist.all_reduce(x, op=op, group=group)
    return x


def _all_gather(x: torch.Tensor, dim: int, group, meter, phase) -> torch.Tensor:
    p = group_size(group)
    if p == 1:
        return x
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((p * x.shape[0],) + tuple(x.shape[1:]))
    _record(meter, "all_gather", phase, out, p)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group, meter, phase) -> torch.Tensor:
    p = group_size(group)
    if p == 1:
        return x
    if x.shape[dim] % p:
        raise ValueError(f"reduce-scatter: size {x.shape[dim]} of dim {dim} is not divisible by "
                         f"the group size {p}")
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((x.shape[0] // p,) + tuple(x.shape[1:]))
    _record(meter, "reduce_scatter", phase, x, p)
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, x, group=group)
    return out.movedim(0, dim)


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    p = group_size(group)
    if p == 1:
        return x
    if x.shape[dim] % p:
        raise ValueError(f"cannot split size {x.shape[dim]} of dim {dim} over {p} ranks evenly")
    return x.chunk(p, dim=dim)[group_rank(group)].contiguous()


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group, meter, phase) -> torch.Tensor:
    """Split ``scatter_dim`` in p chunks, send chunk i to rank i, concatenate the received
    chunks along ``gather_dim`` (in rank order)."""
    p = group_size(group)
    if p == 1:
        return x
    if x.shape[scatter_dim] % p:
        raise ValueError(f"all-to-all: size {x.shape[scatter_dim]} of dim {scatter_dim} is not "
                         f"divisible by the group size {p}")
    inp = torch.stack(x.chunk(p, dim=scatter_dim), dim=0).contiguous()  # [p, ...chunk]
    out = torch.empty_like(inp)
    _record(meter, "all_to_all", phase, inp, p)
    dist.all_to_all_single(out, inp, group=group)
    return torch.cat(out.unbind(0), dim=gather_dim)


def all_gather_tensor(x: torch.Tensor, dim: int, group, meter: Optional[Meter] = None) -> torch.Tensor:
    """All-gather along ``dim`` without autograd (e.g. queries for the selection)."""
    return _all_gather(x, dim, group, meter, "fwd")


def local_chunk(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's chunk of a tensor replicated over ``group`` (no autograd, no traffic)."""
    return _split(x, dim, group)


# ----------------------------------------------------------------------------- autograd functions
class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, meter):
        ctx.group, ctx.meter = group, meter
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return all_reduce_(g.contiguous().clone(), ctx.group, ctx.meter, "bwd"), None, None


class _ReduceGrads(torch.autograd.Function):
    """Identity on several tensors; their gradients summed in one flat all-reduce."""

    @staticmethod
    def forward(ctx, group, meter, *ts):
        ctx.group, ctx.meter = group, meter
        return tuple(t.view_as(t) for t in ts)

    @staticmethod
    def backward(ctx, *grads):
        flat = torch.cat([g.reshape(-1) for g in grads])
        all_reduce_(flat, ctx.group, ctx.meter, "bwd")
        out, offset = [], 0
        for g in grads:
            out.append(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return (None, None, *out)


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, meter):
        return all_reduce_(x.contiguous().clone(), group, meter, "fwd")

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class _GatherAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, meter):
        ctx.dim, ctx.group, ctx.meter = dim, group, meter
        return _all_gather(x, dim, group, meter, "fwd")

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.dim, ctx.group, ctx.meter, "bwd"), None, None, None


class _ReduceScatterAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, meter):
        ctx.dim, ctx.group, ctx.meter = dim, group, meter
        return _reduce_scatter(x, dim, group, meter, "fwd")

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.dim, ctx.group, ctx.meter, "bwd"), None, None, None


class _SplitAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, meter):
        ctx.dim, ctx.group, ctx.meter = dim, group, meter
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.dim, ctx.group, ctx.meter, "bwd"), None, None, None


class _GatherNoReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, meter):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group, meter, "fwd")

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.dim, ctx.group), None, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group, meter):
        ctx.dims, ctx.group, ctx.meter = (scatter_dim, gather_dim), group, meter
        return _all_to_all(x, scatter_dim, gather_dim, group, meter, "fwd")

    @staticmethod
    def backward(ctx, g):
        s, gd = ctx.dims
        return _all_to_all(g, gd, s, ctx.group, ctx.meter, "bwd"), None, None, None, None


# ----------------------------------------------------------------------------- public API
def copy_to_region(x: torch.Tensor, group, meter: Optional[Meter] = None) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient over ``group`` (any shape)."""
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group, meter)


def reduce_grad(param: torch.Tensor, group, meter: Optional[Meter] = None) -> torch.Tensor:
    """A replicated parameter whose uses are split over ``group``: its gradient is summed."""
    return copy_to_region(param, group, meter)


def reduce_grads(params: list[torch.Tensor], group, meter: Optional[Meter] = None) -> list[torch.Tensor]:
    """``reduce_grad`` for several parameters with one all-reduce (a flat bucket) in backward.

    The tensors must share a dtype. Returns identity views in the same order.
    """
    if group_size(group) == 1 or not params:
        return list(params)
    return list(_ReduceGrads.apply(group, meter, *params))


def reduce_from_region(x: torch.Tensor, group, meter: Optional[Meter] = None) -> torch.Tensor:
    """All-reduce (sum) forward, identity backward (any shape)."""
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group, meter)


def gather_along(x: torch.Tensor, dim: int, group, meter: Optional[Meter] = None) -> torch.Tensor:
    """[.., n, ..] -> [.., p*n, ..] by all-gather forward; reduce-scatter backward."""
    return x if group_size(group) == 1 else _GatherAlong.apply(x, dim, group, meter)


def reduce_scatter_along(x: torch.Tensor, dim: int, group, meter: Optional[Meter] = None) -> torch.Tensor:
    """[.., p*n, ..] -> [.., n, ..] summed over ranks; all-gather backward."""
    return x if group_size(group) == 1 else _ReduceScatterAlong.apply(x, dim, group, meter)


def split_along(x: torch.Tensor, dim: int, group, meter: Optional[Meter] = None) -> torch.Tensor:
    """This rank's chunk of a tensor replicated over ``group``; all-gather backward."""
    return x if group_size(group) == 1 else _SplitAlong.apply(x, dim, group, meter)


def gather_no_reduce(x: torch.Tensor, dim: int, group, meter: Optional[Meter] = None) -> torch.Tensor:
    """All-gather forward; backward keeps this rank's chunk (gradient replicated on ranks)."""
    return x if group_size(group) == 1 else _GatherNoReduce.apply(x, dim, group, meter)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group,
               meter: Optional[Meter] = None) -> torch.Tensor:
    """Ulysses all-to-all: scatter ``scatter_dim``, gather ``gather_dim``; backward reverses.

    E.g. [B, S/p, heads, D] with scatter_dim=2, gather_dim=1 -> [B, S, heads/p, D].
    """
    return x if group_size(group) == 1 else _AllToAll.apply(x, scatter_dim, gather_dim, group, meter)

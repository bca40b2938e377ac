"""The hooks through which a parallel plan reaches into the model: identity on one device.

Each model class holds one hooks object as ``self.comm`` and calls it at the few points where
a layout changes what happens; the classes here are the single-device defaults, where every
hook is the identity, so a forward reads the same with or without a plan.
``nsa_dist.parallel.parallelize`` shards the layers' projections in place and replaces these
objects with its own (``nsa_dist/parallel/hooks.py``); nothing here imports it.

- ``Region`` (attention, MLP, decoder block, LM head): ``enter`` / ``exit`` a region whose
  projections are sharded over heads or features, and ``shared`` parameters that every rank
  holds whole but uses for its share of the work only (their gradients are summed).
- ``AttentionComm``: also the replicated K/V projections, the head all-to-all of sequence
  parallelism, and the group-consistent block selection.
- ``LMComm``: also the LM's input sharding, the embedding lookup and the loss.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.func import functional_call

# select(q, reduce_importance) -> block indices [B, S, H, n]: the layer's selection alone.
SelectFn = Callable[[torch.Tensor, Optional[Callable]], torch.Tensor]
# attend(reduce_importance=None, block_indices=None, rows=None, q_start=0) -> (o [B, S, HQ, Dv],
# indices [B, S, H, n]): the layer's one NSA call, which selects from its compressed branch
# unless given indices; ``rows`` (a slice of the query rows) at positions q_start.. of the keys
# (context parallelism). select(q, reduce_importance, q_start=0): q's rows at positions q_start..
AttendFn = Callable[..., tuple]


class Region:
    """A block whose projections a plan may shard (identity hooks)."""

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """The block's input [B, S_in, hidden] -> what its sharded projections take."""
        return x

    def exit(self, y: torch.Tensor) -> torch.Tensor:
        """The output projection's result (a partial sum when sharded) -> [B, S_in, hidden]."""
        return y

    def shared(self, *params: torch.Tensor) -> list[torch.Tensor]:
        """Parameters used for every head or position, as tensors to compute with (identity
        views whose gradients a plan sums over the ranks that share the work)."""
        return list(params)


class AttentionComm(Region):
    """Hooks of an attention layer (identity)."""

    def kv_weights(self, *weights: torch.Tensor) -> list[torch.Tensor]:
        """K/V projection weights, as tensors to compute with (a plan sums the gradients of
        replicas when there are more ranks than KV heads)."""
        return list(weights)

    def seq_len(self, local_len: int) -> int:
        """The whole sequence's length S from the length of this rank's input."""
        return local_len

    def local_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions [S] or [B, S] of the whole sequence -> those of this rank's input tokens."""
        return positions

    def query_rows(self, t: torch.Tensor) -> torch.Tensor:
        """A per-query tensor [B, S_q, ...] of the queries this rank attends with -> [B, S, ...]
        of the whole sequence in order (context parallelism gathers its shards; statistics
        only, no gradient)."""
        return t

    def to_heads(self, t: torch.Tensor, kv: bool = False) -> torch.Tensor:
        """[B, S_local, heads, D] -> [B, S, heads', D]: the whole sequence, the heads this
        rank attends with (``kv``: K/V heads, repeated where ranks outnumber them)."""
        return t

    def from_heads(self, o: torch.Tensor) -> torch.Tensor:
        """The inverse of ``to_heads`` on the attention output [B, S, heads', Dv]."""
        return o

    def kv_local(self) -> bool:
        """Whether ``to_heads(t, kv=True)`` returns t itself (no all-to-all or gather), so the
        layer may hand K/V to its branches in any layout (phi's chunks)."""
        return True

    def attend(self, q: torch.Tensor, attend: AttendFn, select: SelectFn) -> tuple:
        """(o, indices) of the NSA function on q [B, S, HQ', Dk], with a selection that is the
        same for every query head of a group even when the group's heads are spread over
        ranks. ``attend`` is the layer's one call (selection inside, from the compressed
        branch's forward); ``select(q, reduce_importance)`` its selection alone."""
        return attend()


class LMComm(Region):
    """Hooks of the decoder LM (identity). ``enter`` is the LM head's input, ``shared`` the
    final norm's weight."""

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """Full-sequence ids or labels [B, S] -> the positions this rank computes."""
        return t

    def embed(self, embedding: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, S_in] -> [B, S_in, hidden]."""
        return embedding(ids)

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy per position: logits [N, V], labels [N] -> [N] float32, 0 at -100."""
        return torch.nn.functional.cross_entropy(loss_precision(logits), labels, ignore_index=-100, reduction="none")

    def mean(self, total: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A sum of token losses over ``labels`` [N] -> the mean over every non-ignored label."""
        return total / (labels != -100).sum()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of logits [B, S, V] against labels [B, S] (-100 ignored)."""
        return torch.nn.functional.cross_entropy(loss_precision(logits).flatten(0, 1), labels.flatten().long(),
                                                 ignore_index=-100)


def loss_precision(logits: torch.Tensor) -> torch.Tensor:
    """Logits in the loss's precision: float32, or float64 for a float64 model (exact tests)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def bound(module: torch.nn.Module, params: list[torch.Tensor]) -> Callable:
    """``module`` computing with ``params`` (its parameters in ``parameters()`` order, as a
    hook returned them). The module itself when they are its own, so that DeepSpeed ZeRO-3,
    which gathers a module's weights when it is called, sees a plain call."""
    named = list(module.named_parameters())
    if len(named) == len(params) and all(p is q for (_, p), q in zip(named, params)):
        return module
    swap = {n: q for (n, _), q in zip(named, params)}
    return lambda *args: functional_call(module, swap, args)

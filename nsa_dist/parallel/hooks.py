"""The communication a plan gives the model's layers: subclasses of the identity hooks in
``nsa_dist/modules/comm.py``, each holding its process groups and meters explicitly.

- ``TPRegion``: enter a tensor-parallel region (forward copy / backward all-reduce, or with
  Megatron SP an all-gather along the sequence / reduce-scatter), leave it (all-reduce, or
  reduce-scatter), and sum the gradients of parameters every rank holds whole.
- ``AttentionPlanComm``: a region plus the K/V replicas' gradient sum (tp > H), the
  Ulysses all-to-all between sequence shards and head shards (K/V heads repeated first when
  a TP rank has fewer than sp), and the group-consistent selection when tp * sp > H
  ("importance": the float64 group importance all-reduced before top-n; "gather_q": the
  group's queries all-gathered and scored whole on every rank; "auto": the fewer bytes).
  With context parallelism (cp > 1) each rank keeps the queries of its zigzag shard: the
  branches' K/V are all-gathered over the CP group in global order (``context.py``) and the
  NSA function runs for the rank's two query chunks at their offsets.
- ``LMPlanComm``: the input's sequence shard (zigzag over CP, then Ulysses), the
  vocab-parallel embedding and loss.

Meter tags (``CommStats``) are the layer's name plus: ``attn.tp_input`` / ``attn.tp_output``
(``attn.sp_gather`` / ``attn.sp_reduce_scatter`` with Megatron SP), ``attn.replicated_grads``,
``attn.kv_replica_grads``, ``attn.ulysses``, ``attn.cp_kv``, ``attn.importance``, ``attn.selection_q``,
``mlp``, ``norm_grads``; ``embed`` and ``lm_head`` for the model.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..modules.comm import AttendFn, AttentionComm, LMComm, Region, SelectFn
from . import collectives as C
from .comm_stats import Meter
from .context import check_cp_seq_len, gather_sequence, zigzag_chunks, zigzag_shard
from .cross_entropy import vocab_parallel_cross_entropy
from .layers import SEQ_DIM, vocab_parallel_embedding
from .state import HeadLayout, ParallelState, check_seq_len

SELECTION_COMM = ("auto", "importance", "gather_q")


def sub(meter: Optional[Meter], name: str) -> Optional[Meter]:
    return None if meter is None else meter.sub(name)


class TPRegion(Region):
    """A region sharded over the TP ``group``. ``sum_shared``: sum shared parameters'
    gradients over the group (their uses are split over it)."""

    def __init__(self, group, megatron_sp: bool, enter_meter: Optional[Meter] = None,
                 exit_meter: Optional[Meter] = None, shared_meter: Optional[Meter] = None,
                 sum_shared: bool = True):
        self.group, self.megatron_sp, self.sum_shared = group, megatron_sp, sum_shared
        self.enter_meter, self.exit_meter, self.shared_meter = enter_meter, exit_meter, shared_meter

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        if self.megatron_sp:
            return C.gather_along(x, SEQ_DIM, self.group, self.enter_meter)
        return C.copy_to_region(x, self.group, self.enter_meter)

    def exit(self, y: torch.Tensor) -> torch.Tensor:
        if self.megatron_sp:
            return C.reduce_scatter_along(y, SEQ_DIM, self.group, self.exit_meter)
        return C.reduce_from_region(y, self.group, self.exit_meter)

    def shared(self, *params: torch.Tensor) -> list[torch.Tensor]:
        # one flat all-reduce in backward for all of them
        return C.reduce_grads(list(params), self.group, self.shared_meter) if self.sum_shared else list(params)


class AttentionPlanComm(TPRegion, AttentionComm):
    """The hooks of one attention layer split over ``state``'s TP and Ulysses groups.

    Input/output [B, S/tp, hidden] shards of the TP group with Megatron SP, [B, S/sp, hidden]
    shards of the Ulysses group with sp > 1, else [B, S, hidden] replicated over TP; with
    cp > 1 all of that within the rank's zigzag shard of S/cp tokens.
    """

    def __init__(self, layout: HeadLayout, state: ParallelState, megatron_sp: bool, meter: Optional[Meter],
                 selection_comm: str, sel_block: int, head_dim: int):
        super().__init__(state.tp_group, megatron_sp, sub(meter, "sp_gather" if megatron_sp else "tp_input"),
                         sub(meter, "sp_reduce_scatter" if megatron_sp else "tp_output"),
                         sub(meter, "replicated_grads"))
        self.layout, self.meter, self.selection_comm = layout, meter, selection_comm
        self.sp, self.sp_group = state.sp, state.sp_group
        self.kv_group = state.kv_share_group(layout.H)[1]  # importance all-reduce / query gather
        self.kv_weight_group = state.tp_kv_share_group(layout.H)[1]  # replicated K/V weights
        self.sel_block, self.head_dim = sel_block, head_dim
        self.cp, self.cp_rank, self.cp_group = state.cp, state.cp_rank, state.cp_group

    def kv_weights(self, *weights: torch.Tensor) -> list[torch.Tensor]:
        return C.reduce_grads(list(weights), self.kv_weight_group, sub(self.meter, "kv_replica_grads"))

    def seq_len(self, local_len: int) -> int:
        return local_len * self.sp * self.cp

    def local_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """The zigzag CP shard's positions, then this rank's Ulysses part of them."""
        dim = positions.dim() - 1
        return C.local_chunk(zigzag_shard(positions, dim, self.cp, self.cp_rank), dim, self.sp_group)

    def query_rows(self, t: torch.Tensor) -> torch.Tensor:
        """[B, S/cp, ...] of the rank's queries -> [B, S, ...] in order (statistics: unmetered)."""
        if self.cp == 1:
            return t
        with torch.no_grad():
            return gather_sequence(t.contiguous(), 1, self.cp_group)

    def to_heads(self, t: torch.Tensor, kv: bool = False) -> torch.Tensor:
        """[B, S/(cp sp), h, D] -> [B, S/cp, h*repeat/sp, D] (Ulysses all-to-all); K/V then
        [B, S, ., D] in global order (all-gather over CP)."""
        if self.sp > 1:
            if kv and self.layout.kv_repeat > 1:
                t = t.repeat_interleave(self.layout.kv_repeat, dim=2)
            t = C.all_to_all(t, 2, 1, self.sp_group, sub(self.meter, "ulysses"))
        if kv and self.cp > 1:
            t = gather_sequence(t, 1, self.cp_group, sub(self.meter, "cp_kv"))
        return t

    def kv_local(self) -> bool:
        return self.sp == 1 and self.cp == 1

    def from_heads(self, o: torch.Tensor) -> torch.Tensor:
        """[B, S, HQ_local, Dv] -> [B, S/sp, HQ/tp, Dv]."""
        return o if self.sp == 1 else C.all_to_all(o, 1, 2, self.sp_group, sub(self.meter, "ulysses"))

    def selection_mode(self, S: int, dtype: torch.dtype) -> str:
        """"local" (no sharing), "importance" or "gather_q" for a sequence of length S."""
        if self.kv_group is None:
            return "local"
        if self.selection_comm != "auto":
            return self.selection_comm
        Ns = -(-S // self.sel_block)
        G = self.layout.HQ // self.layout.H
        elem = torch.tensor([], dtype=dtype).element_size()
        gather = G * self.head_dim * elem  # all-gather: (p-1)/p of it per rank
        reduce = 2 * Ns * 8  # all-reduce of float64: 2 (p-1)/p of it per rank
        return "gather_q" if gather < reduce else "importance"

    def reduce_importance(self, imp: torch.Tensor) -> torch.Tensor:
        """Sum the partial group importance [B, T, H_local, Ns] (float64) over the ranks that
        hold query heads of the same KV head."""
        return C.all_reduce_(imp.contiguous().clone(), self.kv_group, sub(self.meter, "importance"))

    def attend(self, q: torch.Tensor, attend: AttendFn, select: SelectFn) -> tuple:
        if self.cp == 1:
            return self._attend_rows(q, attend, select, q.shape[1])
        # CP: the rank's two zigzag chunks of queries, each at its offset of the sequence.
        S, c = q.shape[1] * self.cp, q.shape[1] // 2
        parts = [self._attend_rows(q, attend, select, S, slice(i * c, (i + 1) * c), start)
                 for i, (start, _) in enumerate(zigzag_chunks(S, self.cp, self.cp_rank))]
        return torch.cat([o for o, _ in parts], dim=1), torch.cat([i for _, i in parts], dim=1)

    def _attend_rows(self, q: torch.Tensor, attend: AttendFn, select: SelectFn, S: int,
                     rows: Optional[slice] = None, q_start: int = 0) -> tuple:
        """(o, indices) of the query ``rows`` (all by default), positions [q_start, ...) of S."""
        at = {} if rows is None else dict(rows=rows, q_start=q_start)
        mode = self.selection_mode(S, q.dtype)
        if mode == "gather_q":
            # The group's queries in head order (share-group ranks hold consecutive heads).
            with torch.no_grad():
                q_rows = q.detach() if rows is None else q.detach()[:, rows]
                q_group = C.all_gather_tensor(q_rows, 2, self.kv_group, sub(self.meter, "selection_q"))
            sel_at = {} if rows is None else dict(q_start=q_start)
            return attend(block_indices=select(q_group, None, **sel_at), **at)
        return attend(reduce_importance=self.reduce_importance if mode == "importance" else None, **at)


class LMPlanComm(TPRegion, LMComm):
    """The LM's hooks: each rank takes its shard of the full-sequence inputs (the zigzag CP
    shard, then its Ulysses part of it); the embedding and the LM head are split over the
    vocabulary (rows [vocab_start, +V/tp)); the loss is the global mean over non-ignored
    labels, identical on every TP, Ulysses and CP rank."""

    def __init__(self, state: ParallelState, megatron_sp: bool, vocab_start: int, root: Optional[Meter]):
        head = sub(root, "lm_head")
        super().__init__(state.tp_group, megatron_sp, head, None, head, sum_shared=megatron_sp)
        self.state, self.vocab_start, self.embed_meter = state, vocab_start, sub(root, "embed")

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        st = self.state
        if st.cp > 1:
            check_cp_seq_len(t.shape[1], st.cp, st.sp, st.tp, self.megatron_sp)
        else:
            check_seq_len(t.shape[1], st.tp, st.sp, self.megatron_sp)
        return C.local_chunk(zigzag_shard(t, 1, st.cp, st.cp_rank), 1, st.sp_group)

    def embed(self, embedding: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_embedding(ids, embedding.weight, self.vocab_start, self.group,
                                        "reduce_scatter_seq" if self.megatron_sp else "reduce", self.embed_meter)

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, labels, self.vocab_start, self.group, self.enter_meter)

    def mean(self, total: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seq = self.state.seq_group  # every rank holding part of the sequence
        total = C.reduce_from_region(total, seq, self.enter_meter)
        return total / C.all_reduce_((labels != -100).sum().to(total.dtype), seq)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lab = labels.reshape(-1)
        return self.mean(self.token_losses(logits.reshape(-1, logits.shape[-1]), lab).sum(), lab)

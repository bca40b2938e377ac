"""NSA attention under tensor parallel, Megatron SP and Ulysses, with group-consistent selection.

Heads are split over P = tp * sp ranks, at head-rank ``tp_rank * sp + sp_rank``:
- TP gives each rank HQ/tp query heads. KV heads: H/tp per rank when tp divides H; when
  H divides tp, the tp/H ranks of a group each hold a replica of its KV projection (the
  replicas' gradients are summed over those ranks).
- Ulysses (sp > 1) takes the sequence-sharded projections [B, S/sp, heads, D] to the full
  sequence with heads/sp heads by an all-to-all, runs NSA, and goes back. When a TP rank's
  KV heads H_t are fewer than sp, each is repeated sp/H_t times before the all-to-all (its
  gradient is summed by the repeat's backward).
- Group consistency (SPEC Eq. 10): when P > H, the ranks holding query heads of one KV
  head (``kv_share_group``) must choose from the whole group's importance. Two ways, same
  choice as one device: ``"importance"`` sums their partial float64 importance
  [B, T, H_local, Ns] before top-n (all-reduce, through ``select_blocks``'s
  ``reduce_importance``); ``"gather_q"`` all-gathers the group's (detached) queries
  [B, S, G, Dk] and scores the whole group on every rank. Per query the first sends
  16 * Ns bytes over the wire (all-reduce of float64), the second about G * Dk * 2 (bf16):
  ``"auto"`` picks the smaller, so long sequences gather queries.
- Replicated parameters whose uses are split over TP (gate.fc1, phi) get their
  gradients summed over TP in backward, so they stay identical on every rank.

Gradients of every parameter are complete over TP; over Ulysses each rank holds the part
from its sequence shard and the data-parallel reduction (DeepSpeed's sequence-data-
parallel group, or ``parallelize.allreduce_sequence_parallel_grads``) sums them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

from .. import ops
from ..modules.attention import BRANCHES, AttentionStats, NSAAttention, prepare_branches, tokens_read
from ..modules.rope import position_ids_from_cu_seqlens
from . import collectives as C
from .comm_stats import Meter
from .layers import SEQ_DIM, shard_param
from .state import ParallelState, check_model_layout


class HeadLayout:
    """Which heads this rank holds (pure arithmetic, see module docstring)."""

    def __init__(self, num_heads: int, num_kv_heads: int, tp: int, sp: int, tp_rank: int, sp_rank: int):
        check_model_layout(num_heads, num_kv_heads, tp, sp)
        self.HQ, self.H, self.tp, self.sp = num_heads, num_kv_heads, tp, sp
        self.q_per_tp = num_heads // tp
        self.q_start = tp_rank * self.q_per_tp
        if tp <= num_kv_heads:
            self.kv_per_tp, self.kv_start = num_kv_heads // tp, tp_rank * (num_kv_heads // tp)
        else:
            self.kv_per_tp, self.kv_start = 1, tp_rank // (tp // num_kv_heads)
        # Ulysses: repeat each TP-local KV head so that every sp rank gets at least one.
        self.kv_repeat = max(1, sp // self.kv_per_tp)
        self.q_local = self.q_per_tp // sp  # query heads attended on this rank
        self.kv_local = max(1, self.kv_per_tp // sp)
        P, hr = tp * sp, tp_rank * sp + sp_rank
        # Global KV heads attended on this rank (for gathering the selection back).
        self.kv_global_start = hr * num_kv_heads // P if P <= num_kv_heads else hr // (P // num_kv_heads)


class ParallelNSAAttention(nn.Module):
    """NSAAttention split over a ParallelState's TP and Ulysses groups.

    Built from a full single-device ``NSAAttention`` (weights sliced, not re-initialised).
    ``megatron_sp`` (sp must be 1): input and output are sequence shards [B, S/tp, hidden]
    of the TP group. With Ulysses: [B, S/sp, hidden] shards of the sp group. Otherwise
    [B, S, hidden] replicated over TP. ``cu_seqlens`` / ``position_ids`` always describe
    the full sequence.
    """

    def __init__(self, attn: NSAAttention, state: ParallelState, megatron_sp: bool = False,
                 meter: Optional[Meter] = None, selection_comm: str = "auto"):
        super().__init__()
        if selection_comm not in ("auto", "importance", "gather_q"):
            raise ValueError(f"selection_comm must be 'auto', 'importance' or 'gather_q', got "
                             f"{selection_comm!r}")
        self.selection_comm = selection_comm
        if megatron_sp and state.sp > 1:
            raise ValueError("Megatron sequence parallel together with Ulysses (sp > 1) is not "
                             "supported; use megatron_sp=False with sp > 1, or sp=1")
        L = HeadLayout(attn.num_heads, attn.num_kv_heads, state.tp, state.sp, state.tp_rank, state.sp_rank)
        self.layout, self.state, self.megatron_sp, self.meter = L, state, megatron_sp, meter
        self.config, self.backend = attn.config, attn.backend
        self.head_dim, self.v_head_dim = attn.head_dim, attn.v_head_dim
        # Held outside the module tree: RotaryEmbedding has no state, and its static ``apply``
        # shadows nn.Module.apply, which DeepSpeed calls on the whole model.
        self.__dict__["rope"] = attn.rope
        dk, dv = self.head_dim, self.v_head_dim
        self.tp_group = state.tp_group
        self.sp_group = state.sp_group
        self.kv_group = state.kv_share_group(attn.num_kv_heads)[1]  # importance all-reduce
        self.kv_weight_group = state.tp_kv_share_group(attn.num_kv_heads)[1]  # replicated K/V weights
        self.q_proj = shard_param(attn.q_proj.weight, 0, L.q_start * dk, (L.q_start + L.q_per_tp) * dk)
        self.k_proj = nn.ParameterDict()
        self.v_proj = nn.ParameterDict()
        for name in attn.k_proj:
            self.k_proj[name] = shard_param(attn.k_proj[name].weight, 0, L.kv_start * dk,
                                            (L.kv_start + L.kv_per_tp) * dk)
            self.v_proj[name] = shard_param(attn.v_proj[name].weight, 0, L.kv_start * dv,
                                            (L.kv_start + L.kv_per_tp) * dv)
        if state.tp > attn.num_kv_heads:  # KV replicas: count them once in gradient norms
            first = state.tp_rank % (state.tp // attn.num_kv_heads) == 0
            for p in list(self.k_proj.values()) + list(self.v_proj.values()):
                p.tensor_model_parallel = first
        g = attn.gate
        self.gate_fc1_w, self.gate_fc1_b = shard_param(g.fc1.weight, None), shard_param(g.fc1.bias, None)
        self.gate_fc2_w = shard_param(g.fc2.weight, 0, L.q_start * 3, (L.q_start + L.q_per_tp) * 3)
        self.gate_fc2_b = shard_param(g.fc2.bias, 0, L.q_start * 3, (L.q_start + L.q_per_tp) * 3)
        # phi is shared by all heads: replicated; deep copies keep the full model untouched.
        self.phi_k = _replicate(attn.phi_k)
        self.phi_v = _replicate(attn.phi_v)
        self.o_proj = shard_param(attn.o_proj.weight, 1, L.q_start * dv, (L.q_start + L.q_per_tp) * dv)
        # Names of the full module's parameters, for gathering back to full shape.
        self.full_names = {"q_proj": "q_proj.weight", "gate_fc1_w": "gate.fc1.weight",
                           "gate_fc1_b": "gate.fc1.bias", "gate_fc2_w": "gate.fc2.weight",
                           "gate_fc2_b": "gate.fc2.bias", "o_proj": "o_proj.weight"}
        for name in attn.k_proj:
            self.full_names[f"k_proj.{name}"] = f"k_proj.{name}.weight"
            self.full_names[f"v_proj.{name}"] = f"v_proj.{name}.weight"

    # ------------------------------------------------------------------ pieces
    def _m(self, name: str) -> Optional[Meter]:
        return None if self.meter is None else self.meter.sub(name)

    def _replicated(self):
        """The TP-replicated parameters (gate fc1, phi) as identity views whose gradients
        are summed over TP in one bucketed all-reduce: (gate_w, gate_b, phi_k, phi_v)."""
        phis = [m for m in (self.phi_k, self.phi_v) if m is not None]
        named = [list(m.named_parameters()) for m in phis]
        flat = [self.gate_fc1_w, self.gate_fc1_b] + [p for ps in named for _, p in ps]
        views = C.reduce_grads(flat, self.tp_group, self._m("replicated_grads"))
        gate_w, gate_b, rest = views[0], views[1], views[2:]
        fns, i = [], 0
        for m, ps in zip(phis, named):
            params = {n: rest[i + j] for j, (n, _) in enumerate(ps)}
            i += len(ps)
            fns.append(lambda blocks, m=m, params=params: functional_call(m, params, (blocks,)))
        phi_k = fns.pop(0) if self.phi_k is not None else None
        phi_v = fns.pop(0) if self.phi_v is not None else None
        return gate_w, gate_b, phi_k, phi_v

    def _kv_weight(self, w: torch.Tensor) -> torch.Tensor:
        return C.reduce_grad(w, self.kv_weight_group, self._m("kv_replica_grads"))

    def _to_heads(self, t: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        """[B, S/sp, h, D] -> [B, S, h*repeat/sp, D] (Ulysses all-to-all)."""
        if self.state.sp == 1:
            return t
        if repeat > 1:
            t = t.repeat_interleave(repeat, dim=2)
        return C.all_to_all(t, 2, 1, self.sp_group, self._m("ulysses"))

    def reduce_importance(self, imp: torch.Tensor) -> torch.Tensor:
        """Sum the partial group importance [B, T, H_local, Ns] (float64) over the ranks that
        hold query heads of the same KV head."""
        return C.all_reduce_(imp.contiguous().clone(), self.kv_group, self._m("importance"))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, return_stats: bool = False,
                return_indices: bool = False):
        """x: [B, S_in, hidden] (see class docstring) -> (y [B, S_in, hidden], extra).

        extra: AttentionStats of this rank's heads if ``return_stats``, the selection
        [B, S, H_local, n] of this rank's KV heads if ``return_indices``, else None.
        """
        L, cfg, dk, dv = self.layout, self.config, self.head_dim, self.v_head_dim
        if self.megatron_sp:
            x = C.gather_along(x, SEQ_DIM, self.tp_group, self._m("sp_gather"))
        else:
            x = C.copy_to_region(x, self.tp_group, self._m("tp_input"))
        B, S_l, _ = x.shape
        q = nn.functional.linear(x, self.q_proj).view(B, S_l, L.q_per_tp, dk)
        kv = {}
        for branch in BRANCHES:
            name = "shared" if cfg.shared_kv else branch
            k = nn.functional.linear(x, self._kv_weight(self.k_proj[name])).view(B, S_l, L.kv_per_tp, dk)
            v = nn.functional.linear(x, self._kv_weight(self.v_proj[name])).view(B, S_l, L.kv_per_tp, dv)
            kv[branch] = (k, v)
        gate_w, gate_b, phi_k, phi_v = self._replicated()
        h = nn.functional.silu(nn.functional.linear(x, gate_w, gate_b))
        gates = torch.sigmoid(nn.functional.linear(h, self.gate_fc2_w, self.gate_fc2_b))
        gates = gates.view(B, S_l, L.q_per_tp, 3)

        # Ulysses: full sequence, heads split further.
        q, gates = self._to_heads(q), self._to_heads(gates)
        kv = {b: (self._to_heads(k, L.kv_repeat), self._to_heads(v, L.kv_repeat)) for b, (k, v) in kv.items()}
        S = q.shape[1]
        positions = self._positions(S, x.device, cu_seqlens, position_ids)
        p = prepare_branches(self.rope, cfg, q, kv, gates, positions, cu_seqlens, phi_k, phi_v)
        q = p["q"]
        idx = self._select(q, p["k_cmp"], cu_seqlens)
        o = ops.nsa_attention(q, p["k_cmp"], p["v_cmp"], p["k_sel"], p["v_sel"], p["k_win"],
                              p["v_win"], gates, cfg, cu_seqlens=cu_seqlens, backend=self.backend,
                              block_indices=idx, canonical_indices=True)
        if self.state.sp > 1:
            o = C.all_to_all(o, 1, 2, self.sp_group, self._m("ulysses"))  # [B, S/sp, HQ/tp, Dv]
        y = nn.functional.linear(o.reshape(B, S_l, -1), self.o_proj)
        if self.megatron_sp:
            y = C.reduce_scatter_along(y, SEQ_DIM, self.tp_group, self._m("sp_reduce_scatter"))
        else:
            y = C.reduce_from_region(y, self.tp_group, self._m("tp_output"))
        if return_stats:
            return y, self._stats(gates, idx, positions)
        return y, (idx if return_indices else None)

    def selection_mode(self, S: int, dtype: torch.dtype) -> str:
        """"local" (no sharing), "importance" or "gather_q" for a sequence of length S."""
        if self.kv_group is None:
            return "local"
        if self.selection_comm != "auto":
            return self.selection_comm
        Ns = -(-S // self.config.sel_block)
        G = self.layout.HQ // self.layout.H
        elem = torch.tensor([], dtype=dtype).element_size()
        gather = G * self.head_dim * elem  # all-gather: (p-1)/p of it per rank
        reduce = 2 * Ns * 8  # all-reduce of float64: 2 (p-1)/p of it per rank
        return "gather_q" if gather < reduce else "importance"

    def _select(self, q: torch.Tensor, k_cmp: torch.Tensor, cu_seqlens) -> torch.Tensor:
        """Block indices [B, S, H_local, n] of this rank's KV heads, group-consistent."""
        backend = "reference" if self.backend == "reference" else "auto"
        mode = self.selection_mode(q.shape[1], q.dtype)
        if mode == "gather_q":
            # The group's queries in head order (share-group ranks hold consecutive heads).
            with torch.no_grad():
                q_group = C.all_gather_tensor(q.detach(), 2, self.kv_group, self._m("selection_q"))
            return ops.select_blocks(q_group, k_cmp, self.config, cu_seqlens=cu_seqlens, backend=backend)
        reducer = self.reduce_importance if mode == "importance" else None
        return ops.select_blocks(q, k_cmp, self.config, cu_seqlens=cu_seqlens, reduce_importance=reducer,
                                 backend=backend)

    @staticmethod
    def _positions(S, device, cu_seqlens, position_ids):
        if position_ids is not None:
            if position_ids.shape[-1] != S:
                raise ValueError(f"position_ids must cover the full sequence ({S}), got "
                                 f"{tuple(position_ids.shape)}")
            return position_ids
        if cu_seqlens is not None:
            return position_ids_from_cu_seqlens(cu_seqlens, S, device)
        return torch.arange(S, device=device)

    def _stats(self, gates, idx, positions) -> AttentionStats:
        """Stats of this rank's heads (the selection of its first KV head)."""
        with torch.no_grad():
            g = gates.detach().float().reshape(-1, 3)
            pos = positions if positions.dim() == 1 else positions[0]
            return AttentionStats(gate_mean=g.mean(0).cpu(), gate_std=g.std(0, unbiased=False).cpu(),
                                  tokens_read=tokens_read(idx, pos, self.config).cpu(),
                                  selected_blocks=idx[0, :, 0].cpu())


def _replicate(module: Optional[nn.Module]) -> Optional[nn.Module]:
    if module is None:
        return None
    import copy

    m = copy.deepcopy(module)
    for p in m.parameters():
        p.nsa_shard = None
    return m

"""The dense-attention baseline under the same layouts as NSA (TP, Megatron SP, Ulysses).

Same head assignment (``HeadLayout``), region entry/exit, K/V replicas for tp > H and
Ulysses repetition for sp > H_t as ``ParallelNSAAttention``; no selection, so no
group-consistency traffic. Lets NSA and dense runs be compared layout for layout.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..modules.dense import DenseAttention
from . import collectives as C
from .comm_stats import Meter
from .layers import SEQ_DIM, shard_param
from .nsa_parallel import HeadLayout, ParallelNSAAttention
from .state import ParallelState


class ParallelDenseAttention(nn.Module):
    """DenseAttention split over TP and Ulysses; input/output as ParallelNSAAttention."""

    def __init__(self, attn: DenseAttention, state: ParallelState, megatron_sp: bool = False,
                 meter: Optional[Meter] = None):
        super().__init__()
        if megatron_sp and state.sp > 1:
            raise ValueError("Megatron sequence parallel together with Ulysses (sp > 1) is not supported")
        L = HeadLayout(attn.num_heads, attn.num_kv_heads, state.tp, state.sp, state.tp_rank, state.sp_rank)
        self.layout, self.state, self.megatron_sp, self.meter = L, state, megatron_sp, meter
        self.head_dim, self.v_head_dim = attn.head_dim, attn.v_head_dim
        self.__dict__["rope"] = attn.rope  # outside the module tree (see ParallelNSAAttention)
        dk, dv = self.head_dim, self.v_head_dim
        self.kv_weight_group = state.tp_kv_share_group(attn.num_kv_heads)[1]
        self.q_proj = shard_param(attn.q_proj.weight, 0, L.q_start * dk, (L.q_start + L.q_per_tp) * dk)
        self.k_proj = shard_param(attn.k_proj.weight, 0, L.kv_start * dk, (L.kv_start + L.kv_per_tp) * dk)
        self.v_proj = shard_param(attn.v_proj.weight, 0, L.kv_start * dv, (L.kv_start + L.kv_per_tp) * dv)
        if state.tp > attn.num_kv_heads:
            first = state.tp_rank % (state.tp // attn.num_kv_heads) == 0
            self.k_proj.tensor_model_parallel = self.v_proj.tensor_model_parallel = first
        self.o_proj = shard_param(attn.o_proj.weight, 1, L.q_start * dv, (L.q_start + L.q_per_tp) * dv)
        self.full_names = {n: f"{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}

    def _m(self, name: str) -> Optional[Meter]:
        return None if self.meter is None else self.meter.sub(name)

    def _to_heads(self, t: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        if self.state.sp == 1:
            return t
        if repeat > 1:
            t = t.repeat_interleave(repeat, dim=2)
        return C.all_to_all(t, 2, 1, self.state.sp_group, self._m("ulysses"))

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, return_stats: bool = False, **_):
        """x: [B, S_in, hidden] -> (y [B, S_in, hidden], None)."""
        L, st = self.layout, self.state
        if self.megatron_sp:
            x = C.gather_along(x, SEQ_DIM, st.tp_group, self._m("sp_gather"))
        else:
            x = C.copy_to_region(x, st.tp_group, self._m("tp_input"))
        B, S_l, _ = x.shape
        kvw = C.reduce_grads([self.k_proj, self.v_proj], self.kv_weight_group, self._m("kv_replica_grads"))
        q = self._to_heads(nn.functional.linear(x, self.q_proj).view(B, S_l, L.q_per_tp, self.head_dim))
        k = self._to_heads(nn.functional.linear(x, kvw[0]).view(B, S_l, L.kv_per_tp, self.head_dim), L.kv_repeat)
        v = self._to_heads(nn.functional.linear(x, kvw[1]).view(B, S_l, L.kv_per_tp, self.v_head_dim), L.kv_repeat)
        S = q.shape[1]
        positions = ParallelNSAAttention._positions(S, x.device, cu_seqlens, position_ids)
        cos, sin = self.rope.cos_sin(positions, q.dtype)
        q = self.rope.rotate(q, cos, sin).transpose(1, 2)
        k = self.rope.rotate(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        bounds = [0, S] if cu_seqlens is None else cu_seqlens.tolist()
        outs = [nn.functional.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                                           is_causal=True, enable_gqa=True)
                for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        o = torch.cat(outs, dim=2).transpose(1, 2)  # [B, S, heads, Dv]
        if st.sp > 1:
            o = C.all_to_all(o, 1, 2, st.sp_group, self._m("ulysses"))
        y = nn.functional.linear(o.reshape(B, S_l, -1), self.o_proj)
        if self.megatron_sp:
            return C.reduce_scatter_along(y, SEQ_DIM, st.tp_group, self._m("sp_reduce_scatter")), None
        return C.reduce_from_region(y, st.tp_group, self._m("tp_output")), None

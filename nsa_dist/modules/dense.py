"""Dense causal attention with the same q/k/v/o projections: the baseline NSA is measured against."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .comm import AttentionComm, bound
from .rope import RotaryEmbedding, token_positions


class DenseAttention(nn.Module):
    """Causal GQA attention through PyTorch SDPA (flash backend on CUDA when it applies).

    x: [B, S, hidden] -> (y [B, S, hidden], None). Packed documents (cu_seqlens, B = 1)
    are attended one by one so that nothing crosses a boundary. ``self.comm`` holds a
    parallel plan's hooks, as in NSAAttention.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 v_head_dim: int = 0, rope_theta: float = 10000.0):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim or head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.v_head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.v_head_dim, hidden_size, bias=False)
        self.rope = RotaryEmbedding(head_dim, rope_theta)
        self.comm = AttentionComm()

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, return_stats: bool = False, **_):
        c = self.comm
        x = c.enter(x)
        B, S_l, _ = x.shape
        wk, wv = c.kv_weights(self.k_proj.weight, self.v_proj.weight)
        q = c.to_heads(self.q_proj(x).view(B, S_l, -1, self.head_dim))
        k = c.to_heads(bound(self.k_proj, [wk])(x).view(B, S_l, -1, self.head_dim), kv=True)
        v = c.to_heads(bound(self.v_proj, [wv])(x).view(B, S_l, -1, self.v_head_dim), kv=True)
        S = q.shape[1]
        cos, sin = self.rope.cos_sin(token_positions(S, x.device, cu_seqlens, position_ids), x.dtype)
        q = self.rope.rotate(q, cos, sin).transpose(1, 2)
        k = self.rope.rotate(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        bounds = [0, S] if cu_seqlens is None else cu_seqlens.tolist()
        outs = [torch.nn.functional.scaled_dot_product_attention(
                    q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, enable_gqa=True)
                for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        o = c.from_heads(torch.cat(outs, dim=2).transpose(1, 2))  # [B, S_l, heads, Dv]
        return c.exit(self.o_proj(o.reshape(B, S_l, -1))), None

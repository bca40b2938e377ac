"""Dense causal attention with the same q/k/v/o projections: the baseline NSA is measured against."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
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
                 v_head_dim: int = 0, rope_theta: float = 10000.0, fused_projection: bool = True):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim or head_dim
        self.fused_projection = fused_projection
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.v_head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.v_head_dim, hidden_size, bias=False)
        self.rope = RotaryEmbedding(head_dim, rope_theta)
        self.comm = AttentionComm()

    def prepare(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """x [B, S_in, hidden] -> q [B, S, HQ', D], k, v [B, S, H', D] (RoPE on q and k; this
        rank's heads, the whole sequence) and "positions". Fused: one GEMM for q, k and v."""
        c = self.comm
        x = c.enter(x)
        B, S_l, _ = x.shape
        dk = self.head_dim
        positions = token_positions(c.seq_len(S_l), x.device, cu_seqlens, position_ids)
        cos, sin = self.rope.cos_sin(c.local_positions(positions), x.dtype)
        wk, wv = c.kv_weights(self.k_proj.weight, self.v_proj.weight)
        if self.fused_projection:
            y = F.linear(x, torch.cat([self.q_proj.weight, wk, wv]))
            nq, nk = self.q_proj.weight.shape[0], wk.shape[0]
            qk = self.rope.rotate(y[..., :nq + nk].unflatten(-1, (-1, dk)), cos, sin)
            q, k = qk.split([nq // dk, nk // dk], dim=2)
            v = y[..., nq + nk:]
        else:
            q = self.rope.rotate(self.q_proj(x).unflatten(-1, (-1, dk)), cos, sin)
            k = self.rope.rotate(bound(self.k_proj, [wk])(x).unflatten(-1, (-1, dk)), cos, sin)
            v = bound(self.v_proj, [wv])(x)
        return {"q": c.to_heads(q), "k": c.to_heads(k, kv=True),
                "v": c.to_heads(v.unflatten(-1, (-1, self.v_head_dim)), kv=True), "positions": positions}

    def attend(self, p: dict[str, torch.Tensor], cu_seqlens: Optional[torch.Tensor] = None):
        """Causal attention within each document: (o [B, S, HQ', Dv], None)."""
        q, k, v = (p[n].transpose(1, 2) for n in ("q", "k", "v"))
        S = q.shape[2]
        bounds = [0, S] if cu_seqlens is None else cu_seqlens.tolist()
        outs = [F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                               enable_gqa=True)
                for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        return torch.cat(outs, dim=2).transpose(1, 2), None

    def finish(self, o: torch.Tensor) -> torch.Tensor:
        """o [B, S, HQ', Dv] -> y [B, S_in, hidden]."""
        return self.comm.exit(self.o_proj(self.comm.from_heads(o).flatten(2)))

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, return_stats: bool = False, **_):
        """x [B, S_in, hidden] -> (y [B, S_in, hidden], None)."""
        o, _ = self.attend(self.prepare(x, cu_seqlens, position_ids), cu_seqlens)
        return self.finish(o), None

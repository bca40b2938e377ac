"""NSAAttention: projections, RoPE, compression, gates and the NSA function as a layer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..config import NSAConfig
from .. import ops
from .compression import MLPCompressor
from .gate import GateMLP
from .rope import RotaryEmbedding, position_ids_from_cu_seqlens

BRANCHES = ("cmp", "sel", "win")


@dataclass
class AttentionStats:
    """What one NSA layer did in a forward pass (no gradients attached).

    gate_mean, gate_std: [3] (cmp, sel, win) over batch, positions and heads.
    tokens_read: [3] mean K/V positions read per query per branch (SPEC's counters).
    selected_blocks: [S, n] block indices of batch 0 for KV head ``stats_head`` (-1 padded),
    for heatmaps of (query position x block).
    """

    gate_mean: torch.Tensor
    gate_std: torch.Tensor
    tokens_read: torch.Tensor
    selected_blocks: torch.Tensor


def tokens_read(indices: torch.Tensor, positions: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """Mean distinct K/V positions read per query for each branch: [3] float64.

    indices: [B, S, H, n] selection; positions: [S] position of each query in its document.
    cmp reads Nc(t+1) tokens, sel the selected blocks clamped to <= t, win min(w, t+1).
    """
    t = positions.to(torch.float64)
    l, d, ls = config.cmp_block, config.cmp_stride, config.sel_block
    cmp = torch.where(t + 1 >= l, torch.floor((t + 1 - l) / d) + 1, torch.zeros_like(t))
    win = torch.clamp(t + 1, max=float(config.window))
    start = indices.clamp(min=0).to(torch.float64) * ls
    per_block = torch.clamp(torch.minimum(start + ls, t[None, :, None, None] + 1) - start, min=0)
    sel = (per_block * (indices >= 0)).sum(-1)  # [B, S, H]
    return torch.stack([cmp.mean(), sel.mean(), win.mean()])


def prepare_branches(rope: RotaryEmbedding, config: NSAConfig, q: torch.Tensor,
                     kv: dict[str, tuple[torch.Tensor, torch.Tensor]], gates: torch.Tensor,
                     positions: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                     phi_k=None, phi_v=None) -> dict[str, torch.Tensor]:
    """RoPE and compression on projected heads (shared by the layer and its parallel forms).

    q: [B, S, HQ, Dk]; kv: branch -> (k [B, S, H, Dk], v [B, S, H, Dv]); gates [B, S, HQ, 3].
    RoPE goes on q and every branch's keys; the cmp branch is then compressed with phi.
    """
    cos, sin = rope.cos_sin(positions, q.dtype)
    out = {"q": rope.rotate(q, cos, sin), "gates": gates}
    for branch, (k, v) in kv.items():
        k = rope.rotate(k, cos, sin)
        if branch == "cmp":
            k = ops.compress(k, config, phi_k, cu_seqlens)
            v = ops.compress(v, config, phi_v, cu_seqlens)
        out[f"k_{branch}"], out[f"v_{branch}"] = k, v
    return out


class NSAAttention(nn.Module):
    """Native Sparse Attention layer (SPEC.md).

    x: [B, S, hidden] -> [B, S, hidden]. Each branch has its own K/V projection unless
    ``config.shared_kv``; RoPE goes on q, k_sel, k_win and on k_cmp before compression.
    ``backend`` picks the NSA function's implementation ("auto", "reference", "triton").
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 v_head_dim: int = 0, config: Optional[NSAConfig] = None, rope_theta: float = 10000.0,
                 backend: str = "auto"):
        super().__init__()
        config = config or NSAConfig()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.config = config
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim or head_dim
        self.backend = backend
        dk, dv = self.head_dim, self.v_head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * dk, bias=False)
        kv_names = ("shared",) if config.shared_kv else BRANCHES
        self.k_proj = nn.ModuleDict({b: nn.Linear(hidden_size, num_kv_heads * dk, bias=False) for b in kv_names})
        self.v_proj = nn.ModuleDict({b: nn.Linear(hidden_size, num_kv_heads * dv, bias=False) for b in kv_names})
        if config.phi == "mlp":
            self.phi_k = MLPCompressor(config.cmp_block, dk, config.phi_hidden)
            self.phi_v = MLPCompressor(config.cmp_block, dv, config.phi_hidden)
        else:
            self.phi_k = self.phi_v = None
        self.gate = GateMLP(hidden_size, num_heads, config.gate_hidden)
        self.o_proj = nn.Linear(num_heads * dv, hidden_size, bias=False)
        self.rope = RotaryEmbedding(dk, rope_theta)

    def _kv(self, x: torch.Tensor, branch: str):
        name = "shared" if self.config.shared_kv else branch
        B, S, _ = x.shape
        k = self.k_proj[name](x).view(B, S, -1, self.head_dim)
        v = self.v_proj[name](x).view(B, S, -1, self.v_head_dim)
        return k, v

    def project(self, x: torch.Tensor, positions: torch.Tensor,
                cu_seqlens: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Everything the NSA function takes, from the hidden states.

        x: [B, S, hidden]; positions: [S] or [B, S]. Returns q [B, S, HQ, Dk], k_cmp/v_cmp
        [B, Nc, H, D], k_sel/v_sel/k_win/v_win [B, S, H, D], gates [B, S, HQ, 3].
        """
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, -1, self.head_dim)
        kv = {b: self._kv(x, b) for b in BRANCHES}
        return prepare_branches(self.rope, self.config, q, kv, self.gate(x), positions, cu_seqlens,
                                self.phi_k, self.phi_v)

    def attend(self, p: dict[str, torch.Tensor], cu_seqlens: Optional[torch.Tensor] = None,
               reduce_importance: Optional[Callable] = None):
        """Selection then the NSA function. Returns (o [B, S, HQ, Dv], indices [B, S, H, n])."""
        idx = ops.select_blocks(p["q"], p["k_cmp"], self.config, cu_seqlens=cu_seqlens,
                                reduce_importance=reduce_importance,
                                backend="reference" if self.backend == "reference" else "auto")
        o = ops.nsa_attention(p["q"], p["k_cmp"], p["v_cmp"], p["k_sel"], p["v_sel"], p["k_win"],
                              p["v_win"], p["gates"], self.config, cu_seqlens=cu_seqlens,
                              backend=self.backend, block_indices=idx, canonical_indices=True)
        return o, idx

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, return_stats: bool = False,
                stats_head: int = 0):
        """x: [B, S, hidden] -> (y [B, S, hidden], AttentionStats or None).

        cu_seqlens: packed documents (B = 1); positions then restart per document.
        """
        if x.dim() != 3:
            raise ValueError(f"NSAAttention expects x of shape [B, S, hidden], got {tuple(x.shape)}")
        B, S, _ = x.shape
        positions = self._positions(S, x.device, cu_seqlens, position_ids)
        p = self.project(x, positions, cu_seqlens)
        o, idx = self.attend(p, cu_seqlens)
        y = self.o_proj(o.reshape(B, S, -1))
        stats = self.stats(p["gates"], idx, positions, stats_head) if return_stats else None
        return y, stats

    @staticmethod
    def _positions(S, device, cu_seqlens, position_ids):
        if position_ids is not None:
            return position_ids
        if cu_seqlens is not None:
            return position_ids_from_cu_seqlens(cu_seqlens, S, device)
        return torch.arange(S, device=device)

    def stats(self, gates: torch.Tensor, idx: torch.Tensor, positions: torch.Tensor,
              stats_head: int = 0) -> AttentionStats:
        with torch.no_grad():
            g = gates.detach().float().reshape(-1, 3)
            pos = positions if positions.dim() == 1 else positions[0]
            return AttentionStats(
                gate_mean=g.mean(0).cpu(), gate_std=g.std(0, unbiased=False).cpu(),
                tokens_read=tokens_read(idx, pos, self.config).cpu(),
                selected_blocks=idx[0, :, min(stats_head, idx.shape[2] - 1)].cpu())

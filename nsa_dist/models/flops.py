"""Parameter and FLOP counts for MFU: attention counted as NSA actually computes it."""
from __future__ import annotations

import numpy as np

from ..config import ModelConfig


def attended_keys_per_query(seq_len: int, cfg: ModelConfig) -> dict[str, float]:
    """Mean keys one query attends per branch over positions 0..S-1 of a sequence.

    cmp: visible compressed tokens Nc(t+1); sel: the selected blocks clamped to <= t
    (the current block is always selected, so this is (k-1)*l' + (t mod l') + 1 with
    k = min(n, floor(t/l') + 1)); win: min(w, t+1); dense: t+1.
    """
    t = np.arange(seq_len, dtype=np.float64)
    n = cfg.nsa
    if cfg.attention == "dense":
        return {"dense": float((t + 1).mean()) if seq_len else 0.0}
    cmp = np.where(t + 1 >= n.cmp_block, np.floor((t + 1 - n.cmp_block) / n.cmp_stride) + 1, 0)
    k = np.minimum(n.num_selected, np.floor(t / n.sel_block) + 1)
    sel = (k - 1) * n.sel_block + np.mod(t, n.sel_block) + 1
    win = np.minimum(n.window, t + 1)
    mean = (lambda a: float(a.mean()) if seq_len else 0.0)
    return {"cmp": mean(cmp), "sel": mean(sel), "win": mean(win)}


def attention_flops_per_token(seq_len: int, cfg: ModelConfig) -> float:
    """Forward FLOPs of the attention scores and weighted sums, per token, all layers."""
    per_key = 2.0 * cfg.num_heads * (cfg.head_dim + cfg.dv)  # q.k and p.v
    keys = sum(attended_keys_per_query(seq_len, cfg).values())
    flops = per_key * keys
    if cfg.attention == "nsa" and cfg.nsa.phi == "mlp":
        # phi MLP for K and V: one compressed token per d positions and KV head.
        n = cfg.nsa
        hidden_k = n.phi_hidden or max(cfg.head_dim, n.cmp_block * cfg.head_dim // 4)
        hidden_v = n.phi_hidden or max(cfg.dv, n.cmp_block * cfg.dv // 4)
        per_cmp = 2.0 * (n.cmp_block * cfg.head_dim * hidden_k + hidden_k * cfg.head_dim
                         + n.cmp_block * cfg.dv * hidden_v + hidden_v * cfg.dv)
        flops += per_cmp * cfg.num_kv_heads / n.cmp_stride
    return flops * cfg.num_layers


def selection_flops_per_token(seq_len: int, cfg: ModelConfig) -> float:
    """Forward FLOPs per token, all layers, of NSA's block scoring: the selection scores every
    visible compressed key again (q.k for each query head, from the compressed branch's
    log-sum-exp) to rank the blocks. No gradient flows through it: it has no backward."""
    if cfg.attention != "nsa":
        return 0.0
    cmp = attended_keys_per_query(seq_len, cfg)["cmp"]
    return 2.0 * cfg.num_heads * cfg.head_dim * cmp * cfg.num_layers


def training_flops_per_token(seq_len: int, cfg: ModelConfig, matmul_params: int) -> float:
    """Forward + backward (3x forward): 6 * matmul parameters + 3 * attention, plus NSA's block
    scoring once (forward only)."""
    return (6.0 * matmul_params + 3.0 * attention_flops_per_token(seq_len, cfg)
            + selection_flops_per_token(seq_len, cfg))

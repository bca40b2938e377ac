"""Decoder-only LM: embeddings, RMSNorm, NSA (or dense) attention, SwiGLU MLP, LM head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..modules import AttentionStats, DenseAttention, NSAAttention
from .flops import training_flops_per_token
from .loss import chunked_loss_sum


@dataclass
class LMOutput:
    """loss: scalar (mean over labels != -100) or None; logits: [B, S, V], or None when the
    loss was computed in chunks (``model.loss_chunk``); stats: one AttentionStats per layer
    when asked for (NSA layers), else None."""

    loss: Optional[torch.Tensor]
    logits: Optional[torch.Tensor]
    stats: Optional[list[AttentionStats]] = None


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        if cfg.attention == "nsa":
            self.attn = NSAAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                     cfg.dv, cfg.nsa, cfg.rope_theta, backend=backend)
        else:
            self.attn = DenseAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                       cfg.dv, cfg.rope_theta)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.ffn_size)

    def forward(self, h, cu_seqlens, position_ids, return_stats: bool):
        a, stats = self.attn(self.attn_norm(h), cu_seqlens=cu_seqlens, position_ids=position_ids,
                             return_stats=return_stats)
        h = h + a
        return h + self.mlp(self.mlp_norm(h)), stats


def run_layers(model: nn.Module, h: torch.Tensor, cu_seqlens, position_ids, return_stats: bool):
    """The decoder stack of ``model`` (its ``layers``, with activation checkpointing when
    ``model.gradient_checkpointing`` and training). Returns (h, per-layer stats list)."""
    all_stats = []
    ckpt = model.gradient_checkpointing and model.training and torch.is_grad_enabled()
    for layer in model.layers:
        if ckpt:
            h, stats = checkpoint(layer, h, cu_seqlens, position_ids, return_stats, use_reentrant=False)
        else:
            h, stats = layer(h, cu_seqlens, position_ids, return_stats)
        if stats is not None:
            all_stats.append(stats)
    return h, all_stats


class NSADecoderLM(nn.Module):
    """input_ids [B, S] -> LMOutput. Labels are already aligned: labels[:, t] is the
    target of position t (the data pipeline shifts them), -100 where ignored."""

    def __init__(self, cfg: ModelConfig, backend: str = "auto"):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        self.loss_chunk = 0  # > 0: loss over this many positions at a time, no full logits
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg, backend) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual outputs scaled by 1/sqrt(2 * layers);
        layers that are zero by design (gate and phi outputs) stay zero."""
        std = self.config.init_std
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not getattr(m, "zero_init", False):
                scale = (2 * self.config.num_layers) ** -0.5 if name.endswith(("o_proj", "down_proj")) else 1.0
                nn.init.normal_(m.weight, 0.0, std * scale)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                return_stats: bool = False) -> LMOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape "
                             f"{tuple(input_ids.shape)}")
        h, all_stats = run_layers(self, self.embed(input_ids), cu_seqlens, position_ids, return_stats)
        if labels is not None and self.loss_chunk > 0:
            lab = labels.flatten().long()

            def token_losses(hc, lc):
                return nn.functional.cross_entropy(self.lm_head(hc).float(), lc, ignore_index=-100,
                                                   reduction="none")
            total = chunked_loss_sum(self.norm(h).flatten(0, 1), lab, self.loss_chunk, token_losses)
            loss = total / (lab != -100).sum()
            return LMOutput(loss, None, all_stats if return_stats else None)
        logits = self.lm_head(self.norm(h))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten().long(),
                                               ignore_index=-100)
        return LMOutput(loss, logits, all_stats if return_stats else None)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen or (exclude_embeddings and name.startswith("embed.")):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def matmul_parameters(self) -> int:
        """Weights of every Linear applied once per token (the LM head included)."""
        return sum(m.weight.numel() for name, m in self.named_modules()
                   if isinstance(m, nn.Linear) and "phi_" not in name)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at this sequence length (forward + backward)."""
        return training_flops_per_token(seq_len, self.config, self.matmul_parameters())

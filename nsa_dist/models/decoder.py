"""Decoder-only LM: embeddings, RMSNorm, NSA (or dense) attention, SwiGLU MLP, LM head."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..modules import AttentionStats, DenseAttention, LMComm, NSAAttention, Region, SelectionMemo
from ..modules.comm import bound
from ..modules.dense import CausalAttention, keep_attention_outputs
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
    """x [B, S, hidden] -> [B, S, hidden]; ``self.comm``: a plan's region hooks (the gate and
    up projections may be column shards, the down projection a row shard)."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.comm = Region()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.comm.enter(x)
        return self.comm.exit(self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str, kernel: Optional[CausalAttention] = None):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        if cfg.attention == "nsa":
            self.attn = NSAAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                     cfg.dv, cfg.nsa, cfg.rope_theta, backend=backend,
                                     fused_projection=cfg.fused_projection)
        else:
            self.attn = DenseAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                       cfg.dv, cfg.rope_theta, fused_projection=cfg.fused_projection,
                                       kernel=kernel)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.ffn_size)
        self.comm = Region()  # ``shared``: the norm weights (a plan sums them under Megatron SP)

    def forward(self, h, cu_seqlens, position_ids, return_stats: bool, keep_attention: bool = False,
                memo: Optional[SelectionMemo] = None):
        """h [B, S_in, hidden] -> (h, AttentionStats or None). ``keep_attention``: the backward
        recomputes norms, projections and the MLP but not the attention. Where the attention
        can keep its results alone (``attn.keeps_outputs``: NSA on the kernels, dense on SDPA)
        the whole block is checkpointed with them kept; else the parts before and after the
        attention function are checkpointed apart and the function keeps its saved tensors.
        ``memo``: an NSA layer's selections, shared by a checkpointed forward and its
        recomputation (``SelectionMemo``)."""
        if keep_attention and self.attn.keeps_outputs(h.device, h.dtype):
            # the whole block recomputed, but not the attention: its results are kept (a
            # fraction of the split below, which keeps the attention's inputs too)
            # (self.forward, not self: the block's module hooks already ran for this call)
            if isinstance(self.attn, NSAAttention):
                return checkpoint(self.forward, h, cu_seqlens, position_ids, return_stats, False,
                                  SelectionMemo(keep_outputs=True), use_reentrant=False)
            return checkpoint(self.forward, h, cu_seqlens, position_ids, return_stats, False, use_reentrant=False,
                              context_fn=partial(keep_attention_outputs, self.attn.kernel))
        w_attn, w_mlp = self.comm.shared(self.attn_norm.weight, self.mlp_norm.weight)
        attn_norm, mlp_norm = bound(self.attn_norm, [w_attn]), bound(self.mlp_norm, [w_mlp])
        if not keep_attention:  # the attention called as a module (DeepSpeed ZeRO-3 sees the call)
            a, stats = self.attn(attn_norm(h), cu_seqlens=cu_seqlens, position_ids=position_ids,
                                 return_stats=return_stats, selection_memo=memo)
            h = h + a
            return h + self.mlp(mlp_norm(h)), stats

        def pre(h):
            return self.attn.prepare(attn_norm(h), cu_seqlens, position_ids)

        def post(h, o):
            h = h + self.attn.finish(o)
            return h + self.mlp(mlp_norm(h))

        p = checkpoint(pre, h, use_reentrant=False)
        o, idx = self.attn.attend(p, cu_seqlens)
        stats = self.attn.stats(p["gates"], idx, p["positions"]) if return_stats and idx is not None else None
        return checkpoint(post, h, o, use_reentrant=False), stats


# recompute "auto": keep the attention's results in as many layers as fit this share
# of the memory left once weights, optimizer state and gradient buffers are in place; the rest
# holds the checkpoints, one layer's recomputation, the loss and the optimizer's temporaries
AUTO_KEEP_FRACTION = 0.5


def recompute_plan(model: nn.Module, h: torch.Tensor, budget: Optional[int] = None,
                   probe: Optional[Callable[[nn.Module], int]] = None) -> list[str]:
    """What the backward recomputes in each layer for hidden states h [B, S_in, hidden]: the
    config's ``recompute`` for every layer, with "auto" resolved to "keep_attention" for the
    last k layers and "full" before them, k the most layers whose kept tensors
    (``attn.kept_bytes``) fit ``budget`` bytes. The last layers, because the backward meets
    them first and frees what they kept before the fully recomputed layers need room.
    "min": the same, then, if all n layers keep their attention, "none" (nothing recomputed)
    for the last m layers, m the most whose saved activations beyond what they keep fit what
    is left of the budget; ``probe(layer)`` gives a layer's saved bytes (``activation_bytes``;
    without a probe, or under tensor / sequence / context parallelism, "min" is "auto").

    budget: default ``model.recompute_budget`` (the trainer sets it from the memory free
    after DeepSpeed's set-up, the same on every rank), else ``AUTO_KEEP_FRACTION`` of the
    GPU memory free at the first call for this shape (kept). "full" on the CPU and under
    ZeRO-3 (``model.allow_keep_attention = False``)."""
    mode = model.config.recompute
    n = len(model.layers)
    if mode not in ("auto", "min"):
        return [mode] * n
    budget = getattr(model, "recompute_budget", None) if budget is None else budget
    if not getattr(model, "allow_keep_attention", True) or (budget is None and h.device.type != "cuda"):
        budget = 0  # ZeRO-3 gathers weights per forward; the CPU has no budget to plan
    cache = model.__dict__.setdefault("_recompute_plans", {})
    key = (tuple(h.shape), h.dtype, budget, mode)
    if key not in cache:
        left = AUTO_KEEP_FRACTION * free_gpu_memory(h.device) if budget is None else budget
        kept = [layer.attn.kept_bytes(h.shape[0], h.shape[1], h.dtype, h.device) for layer in model.layers]
        keep = 0
        for b in reversed(kept):
            if left - b < 0:
                break
            left -= b
            keep += 1
        plan = ["full"] * (n - keep) + ["keep_attention"] * keep
        if mode == "min" and keep == n and probe is not None and _layers_without_collectives(model):
            extra = probe(model.layers[-1]) - kept[-1]  # the layers are alike: one probe for all
            for i in reversed(range(n)):
                if left - extra < 0:
                    break
                left -= extra
                plan[i] = "none"
        cache[key] = plan
    return cache[key]


def _layers_without_collectives(model: nn.Module) -> bool:
    """No tensor / sequence / context parallel plan (whose layers' forwards hold collectives,
    which a probe forward on one rank alone would leave unmatched)."""
    state = getattr(model.comm, "state", None)
    return state is None or getattr(state, "replica_size", 1) == 1


def activation_bytes(layer: nn.Module, h: torch.Tensor, cu_seqlens, position_ids) -> int:
    """Bytes a decoder block saves for its backward when nothing is recomputed, for input h
    [B, S_in, hidden]: one forward of ``layer`` with grad on, each saved tensor's storage
    counted once, parameters not counted (they are there anyway); the result is freed."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = layer(h.detach().requires_grad_(True), cu_seqlens, position_ids, False)
    del out
    return sum(seen.values())


def recompute_summary(model: nn.Module) -> str:
    """What the last training forwards recomputed, for reports: e.g. "keep_attention 6/16"
    (layers keeping the attention's tensors), "full", "none"; one entry per input shape."""
    plans = getattr(model, "_recompute_plans", {})
    if model.config.recompute not in ("auto", "min") or not plans:
        return model.config.recompute if getattr(model, "gradient_checkpointing", False) else "none"
    out = []
    for plan in plans.values():
        parts = [f"{m} {plan.count(m)}/{len(plan)}" for m in ("none", "keep_attention") if plan.count(m)]
        out.append(" + ".join(parts) if parts else "full")
    return ", ".join(out)


def free_gpu_memory(device: torch.device) -> int:
    """Bytes free on ``device``, counting what the caching allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def run_layers(model: nn.Module, h: torch.Tensor, cu_seqlens, position_ids, return_stats: bool):
    """The decoder stack of ``model`` (its ``layers``; when ``model.gradient_checkpointing``
    and training, the backward recomputes what ``recompute_plan`` says per layer; a fully
    recomputed NSA layer reuses its forward's selection). Returns (h, per-layer stats list)."""
    all_stats = []
    ckpt = model.gradient_checkpointing and model.training and torch.is_grad_enabled()
    probe = None
    if model.config.recompute == "min":  # one forward of a layer measures what it saves
        probe = lambda layer: activation_bytes(layer, h, cu_seqlens, position_ids)  # noqa: E731
    plan = recompute_plan(model, h, probe=probe) if ckpt else ["none"] * len(model.layers)
    for layer, mode in zip(model.layers, plan):
        if mode == "full":
            memo = SelectionMemo() if isinstance(layer.attn, NSAAttention) else None
            h, stats = checkpoint(layer, h, cu_seqlens, position_ids, return_stats, False, memo, use_reentrant=False)
        else:
            h, stats = layer(h, cu_seqlens, position_ids, return_stats, keep_attention=mode == "keep_attention")
        if stats is not None:
            all_stats.append(stats)
    return h, all_stats


class NSADecoderLM(nn.Module):
    """input_ids [B, S] -> LMOutput. Labels are already aligned: labels[:, t] is the
    target of position t (the data pipeline shifts them), -100 where ignored.

    ``nsa_dist.parallel.parallelize`` shards this model in place; ``self.comm`` then takes
    each rank's share of the sequence and computes the vocab-parallel loss (the global mean,
    the same on every rank); logits are this rank's slice [B, S_local, V_local].
    """

    def __init__(self, cfg: ModelConfig, backend: str = "auto"):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False  # True: the backward recomputes what cfg.recompute says
        self.loss_chunk = 0  # > 0: loss over this many positions at a time, no full logits
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # dense models: the causal attention every layer runs, picked once per shape
        self.causal_attention = CausalAttention() if cfg.attention == "dense" else None
        self.layers = nn.ModuleList(DecoderBlock(cfg, backend, self.causal_attention)
                                    for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.comm = LMComm()
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
        c = self.comm
        ids, labels = c.shard(input_ids), (None if labels is None else c.shard(labels))
        h, all_stats = run_layers(self, c.embed(self.embed, ids), cu_seqlens, position_ids, return_stats)
        stats = all_stats if return_stats else None
        (w,) = c.shared(self.norm.weight)
        h = c.enter(bound(self.norm, [w])(h))
        if labels is not None and self.loss_chunk > 0:
            lab = labels.flatten().long()
            total = chunked_loss_sum(h.flatten(0, 1), lab, self.loss_chunk,
                                     lambda hc, lc: c.token_losses(self.lm_head(hc), lc))
            return LMOutput(c.mean(total, lab), None, stats)
        logits = self.lm_head(h)
        return LMOutput(None if labels is None else c.loss(logits, labels), logits, stats)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters of the whole model (of the single-device model when sharded)."""
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen or (exclude_embeddings and name.startswith("embed.")):
                continue
            seen.add(id(p))
            total += _full_numel(p)
        return total

    def local_num_parameters(self) -> int:
        """Parameters held here (this rank's shards and replicas when sharded)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def matmul_parameters(self) -> int:
        """Weights of every Linear applied once per token (the LM head included)."""
        return sum(_full_numel(m.weight) for name, m in self.named_modules()
                   if isinstance(m, nn.Linear) and "phi_" not in name)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at this sequence length (forward + backward), whole model."""
        return training_flops_per_token(seq_len, self.config, self.matmul_parameters())


def _full_numel(p: torch.Tensor) -> int:
    """Elements of the full tensor a (possibly sharded) parameter belongs to; a plan records
    the full shape as ``nsa_full_shape`` (parallel/layers.py)."""
    return math.prod(getattr(p, "nsa_full_shape", p.shape))

"""Prefill and one-step decode for NSAAttention and NSADecoderLM, from per-branch caches.

Prefill runs the layer's own forward computation over a right-padded prompt and fills a
``LayerCache``; a decode step projects one new token per sequence with the layer's weights,
appends it to the caches and computes the three branches for that query only, with the
selection rules of the full forward pass (the reference's importance and top-n functions).
Prefill + N decode steps equal one full forward pass (tests/unit/test_inference.py).

Sequences in a batch may have different lengths: every sequence starts at position 0
(right padding), and each decode step writes sequence b at its own position lengths[b].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..modules.attention import NSAAttention
from ..ops.blocks import num_sel_blocks
from ..ops.reference import compute_dtype, top_n_blocks
from .cache import LayerCache, _nc
from .counters import DecodeReads, step_reads
from .kernel_step import append_step, attend_step_kernels, decode_kernels

# ----------------------------------------------------------------------------- helpers
def _raw_kv(kv: dict) -> dict[str, torch.Tensor]:
    """``project_heads``' {branch: (k, v)} -> {k_sel, v_sel, k_win, v_win, k_raw, v_raw}: the
    cache's names (the compression branch's keys before phi are the raw ones)."""
    out = {}
    for branch, (k, v) in kv.items():
        key = "raw" if branch == "cmp" else branch
        out[f"k_{key}"], out[f"v_{key}"] = k, v
    return out


# What the decode path uses of a layer: NSAAttention's interface, so that a copy of the class
# (the to-hf export bundles the model code into its own module) decodes as well.
_LAYER_API = ("project_heads", "compress_heads", "attend", "finish", "config", "num_kv_heads", "head_dim",
              "v_head_dim")


def _check_layer(layer) -> None:
    if not isinstance(layer, NSAAttention) and not all(hasattr(layer, a) for a in _LAYER_API):
        raise TypeError(f"expected an NSAAttention layer, got {type(layer).__name__} "
                        "(the decode path covers NSA layers; dense models are not supported)")


def _check_like(x: torch.Tensor, weight: torch.Tensor, name: str, dtype: bool = True) -> None:
    """ValueError when x is not on weight's device (or, with ``dtype``, not in its dtype)."""
    if x.device != weight.device:
        raise ValueError(f"{name} is on {x.device} but the model on {weight.device}; move one of them")
    if dtype and x.dtype != weight.dtype:
        raise ValueError(f"{name} has dtype {x.dtype} but the model's weights {weight.dtype}; cast the "
                         "input or the model (model.to(dtype))")


def _masked_softmax(s: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``valid``; rows with nothing valid give 0."""
    s = s.masked_fill(~valid, torch.finfo(s.dtype).min)
    return torch.softmax(s, dim=-1) * valid.to(s.dtype)


def _check_prompt(B: int, P: int, lengths: Optional[torch.Tensor], max_len: int, device) -> torch.Tensor:
    """lengths [B] on ``device`` (default P each), or a ValueError before any work: lengths
    outside [1, P] (an empty prompt), a prompt longer than the cache."""
    if P > max_len:
        raise ValueError(f"prompt of {P} tokens exceeds max_len={max_len} (the cache capacity, "
                         "model.config.max_seq_len by default); shorten it or raise max_len")
    if lengths is None:
        return torch.full((B,), P, dtype=torch.long, device=device)
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape [{B}], got {tuple(lengths.shape)}")
    if int(lengths.min()) < 1 or int(lengths.max()) > P:
        raise ValueError(f"every length must be in [1, {P}] (the padded prompt length; an empty prompt "
                         f"needs at least one token, e.g. BOS), got {lengths.tolist()}")
    return lengths.to(device, torch.long)


# ----------------------------------------------------------------------------- layer level
@torch.no_grad()
def prefill_layer(layer: NSAAttention, x: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                  max_len: Optional[int] = None):
    """Full forward over a right-padded prompt, filling a new cache.

    x: [B, P, hidden]; lengths: [B] valid tokens per sequence (default: all P);
    max_len: cache capacity in tokens (default P).
    Returns (y [B, P, hidden] (rows >= lengths[b] are padding), LayerCache, indices [B, P, H, n]).
    Inference only: runs without autograd, like every function of this module that
    touches a cache.
    """
    _check_layer(layer)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, P, hidden], got shape {tuple(x.shape)}")
    B, P, _ = x.shape
    _check_like(x, next(layer.parameters()), "x")
    lengths = _check_prompt(B, P, lengths, max_len or P, x.device)
    heads = layer.project_heads(x, torch.arange(P, device=x.device))
    p = layer.compress_heads(*heads)  # what project() returns, from the same projections
    o, idx = layer.attend(p)
    y = layer.finish(o)
    cache = LayerCache.empty(layer.config, B, max_len or P, layer.num_kv_heads, layer.head_dim,
                             layer.v_head_dim, x.device, x.dtype)
    kv = {k: p[k] for k in ("k_sel", "v_sel", "k_win", "v_win", "k_cmp", "v_cmp")}
    kv["k_raw"], kv["v_raw"] = heads[1]["cmp"]  # the compression branch before phi
    cache.fill(kv, lengths)
    return y, cache, idx


def _project_token(layer: NSAAttention, x: torch.Tensor, pos: torch.Tensor):
    """q [B, HQ, Dk] (RoPE'd), per-branch K/V {name: [B, H, D]}, gates [B, HQ, 3] and
    (phi_k, phi_v) of the token x [B, 1, hidden] at positions pos [B]."""
    q, kv, gates, phis = layer.project_heads(x, pos[:, None], fused=False)  # one token: unfused
    return q[:, 0], {k: v[:, 0] for k, v in _raw_kv(kv).items()}, gates[:, 0], phis


def check_step_input(layer: NSAAttention, x: torch.Tensor, cache: LayerCache) -> torch.Tensor:
    """x as [B, 1, hidden], or a ValueError naming what does not fit (nothing written yet)."""
    _check_layer(layer)
    if x.dim() == 2:
        x = x[:, None]
    if x.dim() != 3 or x.shape[1] != 1:
        raise ValueError(f"decode_layer takes one token per sequence, x [B, 1, hidden]; got {tuple(x.shape)}")
    if x.shape[0] != cache.batch:
        raise ValueError(f"x has batch {x.shape[0]} but the cache holds {cache.batch} sequences")
    cache.check_layer(layer.config, layer.num_kv_heads, layer.head_dim, layer.v_head_dim)
    cache.check_input(x)
    cache.check_input(next(layer.parameters()), "the layer's weights")
    cache.check_room()
    return x


def layer_step(layer: NSAAttention, x: torch.Tensor, cache: LayerCache, kernels=None, count_reads: bool = True):
    """One decode step of a checked input x [B, 1, hidden] (``check_step_input``).

    kernels: the decode kernel module (``kernel_step.decode_kernels``) or None for PyTorch.
    Returns (y [B, 1, hidden], indices [B, H, n], DecodeReads or None).
    """
    q, kv, gates, (phi_k, phi_v) = _project_token(layer, x, cache.lengths)
    if kernels is None:
        cache.append(kv, phi_k, phi_v)
        o, idx, reads = attend_step(q, gates, cache, count_reads=count_reads)
    else:
        append_step(kernels, cache, kv, phi_k, phi_v)
        o, idx = attend_step_kernels(kernels, q, gates, cache)
        reads = step_reads(idx, cache.lengths, cache.config) if count_reads else None
    y = layer.finish(o.reshape(x.shape[0], 1, o.shape[1], -1).to(x.dtype))
    return y, idx, reads if count_reads else None


@torch.no_grad()
def decode_layer(layer: NSAAttention, x: torch.Tensor, cache: LayerCache, backend: str = "auto",
                 count_reads: bool = True):
    """One decode step: x [B, 1, hidden] (or [B, hidden]) is the token at position lengths[b].

    Appends its K/V to ``cache`` (emitting compressed tokens when due) and attends with the
    three branches. backend: "auto" (decode kernels on CUDA, PyTorch elsewhere), "reference"
    or "triton". Returns (y [B, 1, hidden], indices [B, H, n], DecodeReads, or None when
    count_reads is False).
    """
    kernels = decode_kernels(backend, x.device, x.dtype)
    return layer_step(layer, check_step_input(layer, x, cache), cache, kernels, count_reads)


def select_step(q: torch.Tensor, cache: LayerCache, scale: Optional[float] = None):
    """Compressed attention probabilities and the selection for the newest query.

    q: [B, HQ, Dk] at positions t = lengths - 1. Returns (p_cmp [B, H, G, N] in the compute
    dtype, indices [B, H, n]); N = max Nc over the batch.
    """
    cfg = cache.config
    B, HQ, Dk = q.shape
    H = cache.num_kv_heads
    cdt = compute_dtype(q.dtype)
    sc = Dk ** -0.5 if scale is None else scale
    S = cache.lengths.to(q.device)
    nc = _nc(S, cfg)
    N = int(nc.max())
    qg = q.to(cdt).reshape(B, H, HQ // H, Dk)
    kc = cache.k_cmp[:, :N].to(cdt)
    s = torch.einsum("bhgd,bnhd->bhgn", qg, kc) * sc
    visible = torch.arange(N, device=q.device)[None, :] < nc[:, None]  # [B, N]
    p = _masked_softmax(s, visible[:, None, None, :])
    imp = block_importance(p, num_sel_blocks(int(S.max()), cfg), cfg)  # [B, H, Ns]
    # Batch plays the reference's query-tile axis (each sequence has its own position).
    idx = top_n_blocks(imp[None], S - 1, cfg)[0]  # [B, H, n]
    return p, idx


def block_importance(p: torch.Tensor, Ns: int, config) -> torch.Tensor:
    """Eq. 9 then Eq. 10 for one query per sequence, in O(Nc) instead of O(Nc * Ns).

    p: [B, H, G, N] compressed probabilities -> [B, H, Ns] float64. Compressed token i
    starts at i*d, so block j overlaps exactly the tokens j*r - lead .. j*r + r - 1
    (r = l'/d, lead = (l-d)/d) with the same overlap pattern for every j: a strided window
    sum with fixed integer weights. Same values as ``p @ overlap_weights`` (the reference),
    summed per head in float64 and then over the group.
    """
    l, d, ls = config.cmp_block, config.cmp_stride, config.sel_block
    r, lead = ls // d, (l - d) // d
    N = p.shape[-1]
    pp = torch.nn.functional.pad(p.to(torch.float64), (lead, Ns * r - N))
    windows = pp.unfold(-1, lead + r, r)  # [B, H, G, Ns, lead + r]
    start = (torch.arange(lead + r, device=p.device) - lead) * d  # token start - block start
    overlap = (torch.clamp(start + l, max=ls) - torch.clamp(start, min=0)).clamp(min=0) // d
    return (windows * overlap.to(torch.float64)).sum(-1).sum(2)


def attend_step(q: torch.Tensor, gates: torch.Tensor, cache: LayerCache, scale: Optional[float] = None,
                count_reads: bool = True):
    """The NSA function for one query per sequence over the caches (token already appended).

    q: [B, HQ, Dk] (RoPE'd), gates: [B, HQ, 3]. Returns (o [B, HQ, Dv] in the compute dtype,
    indices [B, H, n], DecodeReads with what the masks let through, or None when
    count_reads is False: then nothing is counted).
    """
    cfg = cache.config
    B, HQ, Dk = q.shape
    H, Dv = cache.num_kv_heads, cache.v_sel.shape[3]
    G = HQ // H
    cdt = compute_dtype(q.dtype)
    sc = Dk ** -0.5 if scale is None else scale
    S = cache.lengths.to(q.device)
    t = S - 1
    qg = q.to(cdt).reshape(B, H, G, Dk)
    dev = q.device

    # compressed branch
    p_cmp, idx = select_step(q, cache, sc)
    N = p_cmp.shape[-1]
    o_cmp = torch.einsum("bhgn,bnhd->bhgd", p_cmp, cache.v_cmp[:, :N].to(cdt))

    # selected blocks, gathered from the selection cache as contiguous blocks
    ls, n = cfg.sel_block, idx.shape[-1]
    cap = cache.k_sel.shape[1]
    kb = cache.k_sel.view(B, cap // ls, ls, H, Dk)
    vb = cache.v_sel.view(B, cap // ls, ls, H, Dv)
    safe = idx.clamp(min=0)  # [B, H, n]
    bi = torch.arange(B, device=dev)[:, None, None]
    hi = torch.arange(H, device=dev)[None, :, None]
    kg = kb[bi, safe, :, hi].reshape(B, H, n * ls, Dk).to(cdt)
    vg = vb[bi, safe, :, hi].reshape(B, H, n * ls, Dv).to(cdt)
    kpos = safe[..., None] * ls + torch.arange(ls, device=dev)  # [B, H, n, l']
    valid = ((idx >= 0)[..., None] & (kpos <= t[:, None, None, None])).reshape(B, H, n * ls)
    s = torch.einsum("bhgd,bhkd->bhgk", qg, kg) * sc
    o_sel = torch.einsum("bhgk,bhkd->bhgd", _masked_softmax(s, valid[:, :, None, :]), vg)

    # sliding window over the ring (slot order does not matter to a softmax)
    w = cfg.window
    if w:
        filled = torch.arange(w, device=dev)[None, :] < S[:, None]  # [B, w]
        s = torch.einsum("bhgd,bwhd->bhgw", qg, cache.k_win.to(cdt)) * sc
        o_win = torch.einsum("bhgw,bwhd->bhgd", _masked_softmax(s, filled[:, None, None, :]),
                             cache.v_win.to(cdt))
    else:
        o_win = qg.new_zeros(B, H, G, Dv)

    g = gates.to(cdt).reshape(B, H, G, 3, 1)
    o = g[..., 0, :] * o_cmp + g[..., 1, :] * o_sel + g[..., 2, :] * o_win
    if not count_reads:
        return o.reshape(B, HQ, Dv), idx, None
    # what the masks above let through: every visible compressed token, the valid selected
    # positions, the filled window slots
    win_reads = filled.sum(-1) if w else torch.zeros_like(S)
    reads = torch.stack([_nc(S, cfg)[:, None].expand(B, H), valid.sum(-1),
                         win_reads[:, None].expand(B, H)], dim=-1).long()
    return o.reshape(B, HQ, Dv), idx, DecodeReads(reads)


# ----------------------------------------------------------------------------- model level
@dataclass
class ModelCache:
    """One LayerCache per decoder layer; lengths [B] tokens cached per sequence."""

    layers: list[LayerCache]

    @property
    def lengths(self) -> torch.Tensor:
        return self.layers[0].lengths

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len


@dataclass
class StepStats:
    """Reads of one decode step: one DecodeReads per layer."""

    layers: list[DecodeReads]

    def per_branch(self) -> dict[str, float]:
        """Mean reads per branch over layers, sequences and heads."""
        per = [r.per_branch() for r in self.layers]
        return {k: sum(p[k] for p in per) / len(per) for k in per[0]}


def _check_model(model) -> None:
    if getattr(model.config, "attention", "nsa") != "nsa":
        raise ValueError("the decode path supports attention='nsa' models only, got "
                         f"attention={model.config.attention!r}")


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, lengths: Optional[torch.Tensor] = None,
            max_len: Optional[int] = None, all_logits: bool = True):
    """Run a right-padded prompt through the model, filling every layer's cache.

    Each layer runs its own forward over the whole prompt (the training kernels on CUDA),
    no per-token loop. input_ids: [B, P]; lengths: [B] (default P each); max_len: cache
    capacity, default ``model.config.max_seq_len``. Returns (logits [B, P, V], or [B, V] at
    each sequence's last prompt token when ``all_logits`` is False, ModelCache).
    """
    _check_model(model)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, P], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    _check_like(input_ids, model.embed.weight, "input_ids", dtype=False)
    B, P = input_ids.shape
    lengths = _check_prompt(B, P, lengths, max_len or model.config.max_seq_len, input_ids.device)
    max_len = max_len or model.config.max_seq_len
    h = model.embed(input_ids)
    caches = []
    for block in model.layers:
        a, cache, _ = prefill_layer(block.attn, block.attn_norm(h), lengths, max_len)
        h = h + a
        h = h + block.mlp(block.mlp_norm(h))
        caches.append(cache)
    h = model.norm(h)
    if not all_logits:  # the head at the last prompt token only (V x P logits at 64k+ are large)
        h = h[torch.arange(B, device=h.device), lengths - 1]
    return model.lm_head(h), ModelCache(caches)


def check_model_step(model, cache: ModelCache, tokens: torch.Tensor) -> torch.Tensor:
    """tokens as [B, 1] after every check a decode step makes (nothing written yet)."""
    _check_model(model)
    if not isinstance(cache, ModelCache):
        raise TypeError(f"cache must be a ModelCache from prefill(), got {type(cache).__name__}")
    if len(cache.layers) != len(model.layers):
        raise ValueError(f"cache has {len(cache.layers)} layers, the model {len(model.layers)}; "
                         "it was built for another model")
    if tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    tokens = tokens.reshape(-1, 1)
    layer0 = cache.layers[0]
    if tokens.device != layer0.device:
        raise ValueError(f"tokens are on {tokens.device} but the cache on {layer0.device}; move them")
    if tokens.shape[0] != layer0.batch:
        raise ValueError(f"tokens has batch {tokens.shape[0]} but the cache holds {layer0.batch} sequences")
    probe = model.embed.weight.new_empty(0)  # the hidden states' dtype and device
    for block, layer_cache in zip(model.layers, cache.layers):
        layer_cache.check_layer(block.attn.config, block.attn.num_kv_heads, block.attn.head_dim,
                                block.attn.v_head_dim)
        layer_cache.check_input(probe, "the model's hidden state")
        layer_cache.check_room()
    return tokens


def model_step(model, cache: ModelCache, tokens: torch.Tensor, kernels=None, count_reads: bool = True):
    """The decode step of checked tokens [B, 1]: (logits [B, V], [indices [B, H, n]] per layer,
    StepStats or None)."""
    h = model.embed(tokens)
    reads, indices = [], []
    for block, layer_cache in zip(model.layers, cache.layers):
        a, idx, r = layer_step(block.attn, block.attn_norm(h), layer_cache, kernels, count_reads)
        h = h + a
        h = h + block.mlp(block.mlp_norm(h))
        reads.append(r)
        indices.append(idx)
    return model.lm_head(model.norm(h))[:, 0], indices, StepStats(reads) if count_reads else None


@torch.no_grad()
def decode_step(model, cache: ModelCache, tokens: torch.Tensor, backend: str = "auto",
                count_reads: bool = True):
    """Feed one token per sequence (at position lengths[b]). tokens: [B] or [B, 1].

    backend: "auto" (decode kernels on CUDA), "reference" or "triton". Returns (logits
    [B, V], StepStats, or None when count_reads is False).
    """
    tokens = check_model_step(model, cache, tokens)
    weight = model.embed.weight
    kernels = decode_kernels(backend, weight.device, weight.dtype)
    logits, _, stats = model_step(model, cache, tokens, kernels, count_reads)
    return logits, stats

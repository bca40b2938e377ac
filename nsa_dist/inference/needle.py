"""Synthetic needle-in-a-haystack check of NSA's block selection at long context.

Keys are random unit-scale noise except one selection block (the needle), whose keys all
point along one direction ``u``; the last query points along ``u`` too. The compressed
tokens that summarise the needle block then score far above the rest, so the selection of
the last query must contain the needle block, wherever it lies. Keys carry no RoPE here:
the test is about compression + importance + top-n, not positional encoding.

On the CPU only the last query is scored (the reference's own tile function, one tile), so
memory stays O(S * D); on CUDA with the kernels, ``select_blocks`` runs for every query.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import NSAConfig
from ..ops import compress, num_compressed, num_sel_blocks, select_blocks
from ..ops.reference import compressed_probs, group_importance, select_tile
from .cache import LayerCache
from .decode import select_step


@dataclass
class NeedleResult:
    """One depth: where the needle was, whether each path selected it, and its rank by
    importance among all candidate blocks (1 = most important, forced blocks included)."""

    depth: float
    block: int
    picked_reference: bool
    picked_decode: bool
    rank: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.picked_reference and self.picked_decode


def needle_block(S: int, depth: float, config: NSAConfig) -> int:
    """The selection block at relative depth (0 = first block, 1 = last whole block)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    last = S // config.sel_block - 1
    if last < 0:
        raise ValueError(f"seq_len {S} is shorter than one selection block ({config.sel_block})")
    return int(round(depth * last))


def needle_inputs(S: int, block: int, config: NSAConfig, head_dim: int = 64, strength: float = 4.0,
                  seed: int = 0, device=None, dtype: torch.dtype = torch.float32):
    """q [1, 1, 1, Dk] (the query at position S-1) and keys [1, S, 1, Dk] with the needle block."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(1, S, 1, head_dim, generator=gen) / head_dim ** 0.5  # unit-norm-ish noise
    u = torch.randn(head_dim, generator=gen)
    u = u / u.norm()
    ls = config.sel_block
    k[0, block * ls:(block + 1) * ls, 0] = strength * u
    # Without a needle (strength 0) the query is a random direction of the same norm.
    direction = u if strength else torch.randn(head_dim, generator=gen).div_(head_dim ** 0.5)
    q = (max(strength, 1.0) * head_dim ** 0.5 * direction).reshape(1, 1, 1, head_dim)
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype)


def run_needle(S: int, depth: float, config: NSAConfig, head_dim: int = 64, seed: int = 0,
               device=None, strength: float = 4.0) -> NeedleResult:
    """Place the needle at ``depth`` of a sequence of S tokens and check the selections.

    strength scales the needle keys and the query (0 gives a haystack without a needle).
    """
    device = torch.device(device or "cpu")
    block = needle_block(S, depth, config)
    start = time.perf_counter()
    q, k = needle_inputs(S, block, config, head_dim, strength, seed, device)
    k_cmp = compress(k, config)  # [1, Nc, 1, Dk], mean pooling
    scale = head_dim ** -0.5
    t = torch.tensor([S - 1], device=device)
    if device.type == "cuda":
        # All queries through the kernels: noise queries, the needle query last.
        q_all = torch.randn(1, S, 1, head_dim, device=device) / head_dim ** 0.5
        q_all[:, -1:] = q
        ref = select_blocks(q_all, k_cmp, config, scale, backend="auto")[0, -1, 0]
    else:
        ref = select_tile(q, k_cmp, t, S, config, scale)[0, 0, 0]
    # The decode path's selection over a cache holding the same compressed tokens.
    cache = LayerCache.empty(config, 1, S, 1, head_dim, head_dim, device, q.dtype)
    nc = num_compressed(S, config)
    cache.k_cmp[:, :nc] = k_cmp
    cache.set_lengths(torch.tensor([S], device=device))
    _, dec = select_step(q[:, 0], cache, scale)
    with torch.no_grad():
        imp = group_importance(compressed_probs(q, k_cmp, t, config, scale), num_sel_blocks(S, config),
                               config)[0, 0, 0]
    rank = int((imp > imp[block]).sum()) + 1
    return NeedleResult(depth, block, bool((ref == block).any()), bool((dec[0, 0] == block).any()),
                        rank, time.perf_counter() - start)


# ----------------------------------------------------------------------------- through generate()
NEEDLE, QUERY = 1, 2  # token ids of the needle model (0 is padding, the rest haystack)


@dataclass
class GenerateNeedleResult:
    """One depth of the generate() needle: the generated tokens and whether every one of them
    is the answer (QUERY), which the model only produces by attending to the needle block."""

    depth: float
    block: int
    tokens: list[int]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(t == QUERY for t in self.tokens)


def needle_model(max_len: int, config: NSAConfig, head_dim: int = 64, vocab: int = 64, seed: int = 0,
                 backend: str = "auto"):
    """A one-layer NSA model built so that only the selection branch can answer.

    Hidden size = head_dim, one query and one KV head, identity projections, RoPE theta of
    the 1b config. Haystack embeddings are random with zeros in dims ``a`` (the lowest RoPE
    frequency, whose rotation over 128k positions stays under 0.4 rad), ``p`` (the payload)
    and their RoPE partners. The query token is e_a, the needle token e_a + e_p: the query
    scores the needle keys high and every haystack key exactly 0. The gates open the
    selected branch only (g_sel ~ 1, g_cmp = g_win ~ 0) and the head maps e_p to the QUERY
    token, so the model answers QUERY exactly when its selection holds the needle block.
    """
    from ..config import ModelConfig
    from ..models import NSADecoderLM

    D = head_dim
    cfg = ModelConfig(vocab_size=vocab, hidden_size=D, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=D,
                      intermediate_size=16, max_seq_len=max_len, rope_theta=500000.0, tie_embeddings=False,
                      nsa=config)
    model = NSADecoderLM(cfg, backend=backend)
    a, p = D // 2 - 1, 5
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = torch.randn(vocab, D, generator=gen)
        emb[:, [a, a + D // 2, p, p + D // 2]] = 0.0
        emb[0] = 0.0
        emb[NEEDLE] = 0.0
        emb[NEEDLE, a] = emb[NEEDLE, p] = 1.0
        emb[QUERY] = 0.0
        emb[QUERY, a] = 1.0
        model.embed.weight.copy_(emb)
        head = torch.randn(vocab, D, generator=gen)
        head[:, [a, a + D // 2, p, p + D // 2]] = 0.0
        head[QUERY] = 0.0
        head[QUERY, p] = 10.0
        model.lm_head.weight.copy_(head)
        attn = model.layers[0].attn
        eye = torch.eye(D)
        for lin in [attn.q_proj, attn.o_proj, *attn.k_proj.values(), *attn.v_proj.values()]:
            lin.weight.copy_(eye)
        attn.gate.fc2.weight.zero_()
        attn.gate.fc2.bias.copy_(torch.tensor([-30.0, 30.0, -30.0]))  # (cmp, sel, win)
        model.layers[0].mlp.down_proj.weight.zero_()
    return model.eval()


def needle_prompt(seq_len: int, depth: float, config: NSAConfig, vocab: int = 64, seed: int = 0,
                  with_needle: bool = True) -> tuple[torch.Tensor, int]:
    """ids [1, seq_len]: haystack tokens, the needle block at ``depth``, QUERY last."""
    block = needle_block(seq_len - 1, depth, config)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, vocab, (1, seq_len), generator=gen)
    if with_needle:
        ls = config.sel_block
        ids[0, block * ls:(block + 1) * ls] = NEEDLE
    ids[0, -1] = QUERY
    return ids, block


def run_generate_needle(seq_len: int, depth: float, config: NSAConfig, device=None, dtype=torch.float32,
                        new_tokens: int = 4, with_needle: bool = True, backend: str = "auto",
                        cuda_graphs=None, seed: int = 0) -> GenerateNeedleResult:
    """Prefill a ``seq_len``-token needle prompt and generate ``new_tokens`` greedily (the first
    from the prefill's logits, the others through decode steps: the kernels and CUDA graphs
    on CUDA by default). backend / cuda_graphs choose the decode path (generate()); the
    prefill runs the layer's own forward (the training kernels on CUDA)."""
    from .generate import generate

    start = time.perf_counter()
    model = needle_model(seq_len + new_tokens, config, seed=seed).to(device=device, dtype=dtype)
    ids, block = needle_prompt(seq_len, depth, config, model.config.vocab_size, seed, with_needle)
    out = generate(model, ids, new_tokens, backend=backend, cuda_graphs=cuda_graphs, count_reads=False)
    return GenerateNeedleResult(depth, block, out.tokens[0], time.perf_counter() - start)

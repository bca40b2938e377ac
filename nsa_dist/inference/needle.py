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

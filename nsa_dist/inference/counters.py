"""Exact decode read counters (SPEC.md, "Decode reads at step S").

At decode step ``S`` (the query at position ``S-1`` over a cache of ``S`` tokens) NSA reads
``cmp = Nc(S)`` compressed tokens, ``sel = sum over selected j of |[j*l', (j+1)*l') ∩ [0, S)|``
positions of the selection cache and ``win = min(w, S)`` positions of the window cache.
Dense attention with a KV cache reads ``S``.

The decode path counts what its masks actually let through (``DecodeReads``); the functions
here give the closed forms the tests hold those counts to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import NSAConfig
from ..ops.blocks import num_compressed

BRANCH_NAMES = ("cmp", "sel", "win")


@dataclass
class DecodeReads:
    """Distinct K/V positions one decode step read, per sequence, KV head and branch.

    reads: [B, H, 3] int64 (cmp, sel, win); cmp and win are the same for every head, sel
    depends on the head's selected blocks.
    """

    reads: torch.Tensor

    def per_branch(self) -> dict[str, float]:
        """Mean over sequences and heads, by branch name."""
        mean = self.reads.to(torch.float64).mean(dim=(0, 1))
        return {name: float(mean[i]) for i, name in enumerate(BRANCH_NAMES)}

    def total(self) -> torch.Tensor:
        """[B, H] positions read over the three branches."""
        return self.reads.sum(-1)


def _check_S(S: int) -> None:
    if not isinstance(S, int) or S < 1:
        raise ValueError(f"decode step S (cache length including the new token) must be an integer >= 1, got {S!r}")


def sel_reads_from_indices(indices: torch.Tensor, S: int, config: NSAConfig) -> torch.Tensor:
    """SPEC's selection count: sum over selected j (>= 0) of |[j*l', (j+1)*l') ∩ [0, S)|.

    indices: [..., n] selected block indices (-1 padded). Returns [...] int64.
    """
    _check_S(S)
    ls = config.sel_block
    start = indices.clamp(min=0).long() * ls
    inside = (torch.clamp(torch.clamp(start + ls, max=S) - start, min=0)) * (indices >= 0)
    return inside.sum(-1)


def step_reads(indices: torch.Tensor, lengths: torch.Tensor, config: NSAConfig) -> DecodeReads:
    """What a decode step's masks let through, from its selection: indices [B, H, n] (-1
    padded) and lengths [B] (S, the new token included). The kernels read exactly these
    positions (selected blocks clamped to < S, the min(w, S) filled window slots, the Nc(S)
    visible compressed tokens); device ops only, no host sync."""
    ls, l, d = config.sel_block, config.cmp_block, config.cmp_stride
    S = lengths.long()
    start = indices.clamp(min=0).long() * ls
    sel = ((torch.minimum(start + ls, S[:, None, None]) - start).clamp(min=0) * (indices >= 0)).sum(-1)
    cmp = torch.where(S >= l, (S - l) // d + 1, torch.zeros_like(S))
    win = S.clamp(max=config.window)
    B, H = sel.shape
    return DecodeReads(torch.stack([cmp[:, None].expand(B, H), sel, win[:, None].expand(B, H)], dim=-1))


def expected_reads(S: int, config: NSAConfig) -> tuple[int, int, int]:
    """(cmp, sel, win) at decode step S, without needing the selection itself.

    The selection rules fix the count: min(n, number of candidate blocks) blocks are
    selected, the current (possibly partial) block floor((S-1)/l') is always among them
    and every other candidate lies wholly inside [0, S), so
    ``sel = (min(n, cur + 1) - 1) * l' + (S - cur * l')``.
    """
    _check_S(S)
    ls, n = config.sel_block, config.num_selected
    cur = (S - 1) // ls
    sel = (min(n, cur + 1) - 1) * ls + (S - cur * ls)
    return num_compressed(S, config), sel, min(config.window, S)


def seed_reads(S: int, config: NSAConfig) -> int:
    """The seed documents' total ``reads(S) = Nc(S) + n*l' + min(w, S)``.

    Valid only where SPEC says it applies: S a multiple of l' and S >= n*l'.
    """
    _check_S(S)
    ls, n = config.sel_block, config.num_selected
    if S % ls or S < n * ls:
        raise ValueError(f"the seed formula applies only when S is a multiple of l'={ls} and "
                         f"S >= n*l'={n * ls}; got S={S} (use expected_reads instead)")
    return num_compressed(S, config) + n * ls + min(config.window, S)


def dense_reads(S: int) -> int:
    """Dense attention with a KV cache reads every cached position."""
    _check_S(S)
    return S

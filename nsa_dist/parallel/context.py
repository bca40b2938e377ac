"""Context parallelism (CP): the token dimension split over ``cp`` ranks, load-balanced.

Zigzag sharding: the sequence is cut into ``2 * cp`` equal chunks and CP rank ``r`` holds
chunks ``r`` and ``2 cp - 1 - r`` (one early, one late), so that every rank does about the
same causal work. Everything per-token (embedding, norms, MLP, projections, loss) runs on
the rank's ``S / cp`` tokens. Inside attention each rank keeps its queries; what the three
branches read (the raw K/V of the compressed, selected and window branches) is all-gathered
over the CP group and put back in global order (``gather_sequence``), so compression,
selection and the window see exactly the single-device sequence, and the NSA function runs
for the rank's two query chunks at their true offsets (``ops.nsa_attention(q_start=...)``).
The all-gather's backward reduce-scatters the K/V gradients back to the ranks that own
those tokens. docs/parallelism.md ("Context parallelism") gives the bytes per layer.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import collectives as C
from .comm_stats import Meter


def check_cp_seq_len(seq_len: int, cp: int, sp: int = 1, tp: int = 1, megatron_sp: bool = False) -> None:
    """The sequence must cut into 2*cp equal chunks, and a rank's S/cp tokens into the Ulysses
    (or, with Megatron SP, TP) shards; ValueError naming a length that works otherwise."""
    inner = sp * (tp if megatron_sp else 1)
    if seq_len % (2 * cp) == 0 and (seq_len // cp) % inner == 0:
        return
    step = 2 * cp * inner
    raise ValueError(
        f"sequence length {seq_len} does not split over context parallel cp={cp}"
        + (f" x {'tp' if megatron_sp else 'sp'}={inner}" if inner > 1 else "")
        + f": the zigzag layout cuts it into 2*cp = {2 * cp} equal chunks"
        + (f" and each rank's {seq_len // cp if seq_len % cp == 0 else '?'} tokens into {inner} shards"
           if inner > 1 else "")
        + f"; use a multiple of {step}, e.g. {-(-seq_len // step) * step}")


def zigzag_chunks(seq_len: int, cp: int, cp_rank: int) -> list[tuple[int, int]]:
    """The two [start, stop) position ranges CP rank ``cp_rank`` holds, in its local order."""
    c = seq_len // (2 * cp)
    return [(cp_rank * c, (cp_rank + 1) * c), ((2 * cp - 1 - cp_rank) * c, (2 * cp - cp_rank) * c)]


def zigzag_shard(t: torch.Tensor, dim: int, cp: int, cp_rank: int) -> torch.Tensor:
    """This rank's tokens of a full-sequence tensor (chunks r and 2cp-1-r along ``dim``, in
    that order). No autograd pairing: for inputs, labels and positions, which every rank
    holds whole."""
    if cp == 1:
        return t
    check_cp_seq_len(t.shape[dim], cp)
    return torch.cat([t.narrow(dim, a, b - a) for a, b in zigzag_chunks(t.shape[dim], cp, cp_rank)], dim=dim)


def gather_sequence(t: torch.Tensor, dim: int, group, meter: Optional[Meter] = None) -> torch.Tensor:
    """[.., S/cp, ..] zigzag shards of the CP ``group`` -> [.., S, ..] in global order.

    One all-gather forward; backward reduce-scatters the gradient, so each rank gets the sum
    over ranks of the gradient of its own tokens."""
    cp = C.group_size(group)
    if cp == 1:
        return t
    parts = C.gather_along(t, dim, group, meter).chunk(2 * cp, dim=dim)  # rank r: chunks r, 2cp-1-r
    order = [parts[2 * c] if c < cp else parts[2 * (2 * cp - 1 - c) + 1] for c in range(2 * cp)]
    return torch.cat(order, dim=dim)

"""Compression of keys/values into block tokens (SPEC: compression branch)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..config import NSAConfig
from .blocks import host_offsets, num_compressed
from .validation import check_cu_seqlens

# phi maps blocks [B, Nc, H, l, D] to tokens [B, Nc, H, D].
Phi = Callable[[torch.Tensor], torch.Tensor]


def compress(k: torch.Tensor, config: NSAConfig, phi: Optional[Phi] = None,
             cu_seqlens: Optional[torch.Tensor] = None, phi_takes_sequence: bool = False) -> torch.Tensor:
    """Compress ``k`` (keys or values) into ``Nc`` block tokens.

    k: [B, S, H, D] (RoPE already applied to keys). Token i summarises positions
    [i*d, i*d + l). ``phi`` defaults to mean pooling; a callable gets blocks
    [B, Nc, H, l, D] and returns [B, Nc, H, D].
    With ``cu_seqlens`` (B = 1) each document is compressed on its own and the tokens are
    concatenated in document order (offsets: ``compressed_cu_seqlens``); its values are
    read on the host, so a CPU ``cu_seqlens`` needs no GPU sync.
    phi_takes_sequence: phi gets the positions its blocks cover, [B, (Nc-1)*d + l, H, D],
    instead of the blocks (``MLPCompressor.sequence``: no overlapping copies).
    Returns [B, Nc, H, D].
    """
    if k.dim() != 4:
        raise ValueError(f"compress: k must be [B, S, H, D], got shape {tuple(k.shape)}")
    if cu_seqlens is not None:
        bounds = check_cu_seqlens(host_offsets(cu_seqlens), k.shape[0], k.shape[1])
        if len(bounds) > 2:  # one document compresses as an unpacked sequence
            parts = [compress(k[:, s0:s1], config, phi, phi_takes_sequence=phi_takes_sequence)
                     for s0, s1 in zip(bounds[:-1], bounds[1:])]
            return torch.cat(parts, dim=1) if parts else k[:, :0]
    B, S, H, D = k.shape
    Nc = num_compressed(S, config)
    if Nc == 0:
        return k.new_zeros(B, 0, H, D)
    l, d = config.cmp_block, config.cmp_stride
    span = k[:, : (Nc - 1) * d + l]
    blocks = span.unfold(1, l, d)  # [B, Nc, H, D, l]
    if phi is None:
        return blocks.mean(dim=-1)
    out = phi(span) if phi_takes_sequence else phi(blocks.transpose(-1, -2))  # the blocks: [B, Nc, H, l, D]
    if out.shape != (B, Nc, H, D):
        raise ValueError(f"compress: phi returned {tuple(out.shape)}, expected {(B, Nc, H, D)}")
    return out

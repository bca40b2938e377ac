"""Block arithmetic of NSA (SPEC.md): compressed-token counts, visibility, Eq. 9 weights.

Everything here is integer bookkeeping shared by the reference, the kernels, the parallel
layouts and the inference caches, so that they cannot disagree on the block geometry.
"""
from __future__ import annotations

import torch

from ..config import NSAConfig


def num_compressed(S: int, config: NSAConfig) -> int:
    """Nc(S) = 0 if S < l else floor((S - l) / d) + 1."""
    if S < 0:
        raise ValueError(f"sequence length must be >= 0, got {S}")
    l, d = config.cmp_block, config.cmp_stride
    return 0 if S < l else (S - l) // d + 1


def num_sel_blocks(S: int, config: NSAConfig) -> int:
    """Number of selection blocks covering S positions: ceil(S / l')."""
    return -(-S // config.sel_block)


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """Offsets of each document's compressed tokens in a packed ``k_cmp``.

    cu_seqlens: [N+1] document boundaries (FlashAttention convention).
    Returns [N+1] int64 boundaries into the concatenated compressed tokens.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    counts = [num_compressed(int(n), config) for n in lengths]
    out = torch.zeros(len(counts) + 1, dtype=torch.int64)
    if counts:
        out[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
    return out.to(cu_seqlens.device)


def compressed_ends(Nc: int, config: NSAConfig, device=None) -> torch.Tensor:
    """Last position summarised by each compressed token: i*d + l - 1, shape [Nc]."""
    return torch.arange(Nc, device=device) * config.cmp_stride + config.cmp_block - 1


def overlap_weights(Nc: int, Ns: int, config: NSAConfig, device=None,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Eq. 9 as a matrix W [Nc, Ns]: W[i, j] = |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d.

    Because d divides l and l', every overlap is a multiple of d: W holds small integers
    and is exact in any floating dtype. ``p_slc = p_cmp @ W``.
    """
    l, d, ls = config.cmp_block, config.cmp_stride, config.sel_block
    start = torch.arange(Nc, device=device, dtype=torch.int64)[:, None] * d
    jstart = torch.arange(Ns, device=device, dtype=torch.int64)[None, :] * ls
    overlap = (torch.minimum(start + l, jstart + ls) - torch.maximum(start, jstart)).clamp(min=0)
    return (overlap // d).to(dtype)


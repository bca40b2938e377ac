"""Block arithmetic of NSA (SPEC.md): compressed-token counts, visibility, Eq. 9 weights.

Everything here is integer bookkeeping shared by the reference, the kernels, the parallel
layouts and the inference caches, so that they cannot disagree on the block geometry.
"""
from __future__ import annotations

from typing import Optional

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


def compressed_offsets(bounds, config: NSAConfig) -> list[int]:
    """Host form of ``compressed_cu_seqlens``: document offsets (ints) -> compressed offsets."""
    out = [0]
    for a, b in zip(bounds[:-1], bounds[1:]):
        out.append(out[-1] + num_compressed(int(b) - int(a), config))
    return out


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """Offsets of each document's compressed tokens in a packed ``k_cmp``.

    cu_seqlens: [N+1] document boundaries (FlashAttention convention).
    Returns [N+1] int64 boundaries into the concatenated compressed tokens, on cu_seqlens'
    device (its values are read on the host: keep cu_seqlens on the CPU to avoid a GPU sync).
    """
    out = torch.tensor(compressed_offsets(cu_seqlens.tolist(), config), dtype=torch.int64)
    return out.to(cu_seqlens.device)


def host_offsets(cu_seqlens: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``cu_seqlens`` on the CPU, where its values are read (validation, per-document
    slicing, the kernels' launch geometry). A CUDA tensor costs one device-to-host copy, a
    sync, here, instead of one at every place that reads it; a CPU tensor is returned as it
    is. Anything else is returned unchanged for the validation to name."""
    if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.device.type != "cpu":
        return cu_seqlens.cpu()
    return cu_seqlens


def packed(cu_seqlens: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Checked host ``cu_seqlens``, or None when it holds one document (the whole sequence):
    the same function without the per-document bookkeeping (host tile tables, more launches),
    which is what the trainer's one-document samples would otherwise pay at every layer."""
    return None if cu_seqlens is not None and cu_seqlens.numel() == 2 else cu_seqlens


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host-built bookkeeping (offsets, positions, tile tables) onto ``device`` without blocking
    the host: a CUDA copy goes through pinned memory, non-blocking (a copy from pageable
    memory may wait for the stream's queued work)."""
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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


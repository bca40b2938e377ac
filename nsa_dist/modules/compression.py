"""phi: the learnable compression of a block of keys or values into one token."""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F


class MLPCompressor(nn.Module):
    """phi = mean pooling + MLP(block + intra-block position embedding), shared across heads.

    The MLP's last layer and the position embedding start at zero, so a fresh model
    compresses exactly by mean pooling (and a dense checkpoint imports cleanly); training
    moves it away from the mean. Input blocks [B, Nc, H, l, D] -> tokens [B, Nc, H, D]; or,
    with ``stride`` d set, a sequence [B, (Nc-1)*d + l, H, D] whose blocks start every d
    positions (``sequence``).
    """

    def __init__(self, block: int, dim: int, hidden: int = 0, stride: Optional[int] = None):
        super().__init__()
        hidden = hidden or max(dim, block * dim // 4)
        self.block, self.stride = block, stride
        self.pos = nn.Parameter(torch.zeros(block, dim))
        self.fc1 = nn.Linear(block * dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        self.fc2.zero_init = True  # model-wide initialisation leaves it at zero

    def forward(self, x: torch.Tensor, chunks: bool = False) -> torch.Tensor:
        """blocks [B, Nc, H, l, D] or (with ``stride``) a sequence [B, L, H, D] -> [B, Nc, H, D];
        ``chunks``: x is a sequence's chunks [B, n, H, d, D] (``from_chunks``)."""
        if chunks:
            return self.from_chunks(x)
        if x.dim() == 4:
            return self.sequence(x)
        x, blocks = x + self.pos.to(x.dtype), x
        h = F.silu(self.fc1(x.flatten(-2)))
        return blocks.mean(dim=-2) + self.fc2(h)

    def sequence(self, k: torch.Tensor) -> torch.Tensor:
        """phi of every block of k [B, L, H, D] (blocks of l positions every d = ``stride``,
        Nc = (L - l) // d + 1 of them) -> [B, Nc, H, D], without materialising the
        overlapping blocks when d divides l: with m = l / d, block i is chunks i .. i+m-1 of
        d positions, so fc1(block_i) = sum_j W1_j chunk_{i+j} + (b1 + W1 pos) (W1_j: W1's
        columns of the block's j-th chunk) and the mean is the chunk sums' mean; one GEMM
        over the L / d chunks (the FLOPs of the blocks' GEMM), one copy of k instead of m."""
        l, d = self.block, self.stride
        B, L, H, D = k.shape
        if d is None:
            raise ValueError("MLPCompressor.sequence needs the block stride: construct it with stride=d")
        if L < l:
            return k.new_zeros(B, 0, H, D)
        if l % d:  # blocks that do not split into whole chunks: phi over the blocks
            return self(k[:, :L - (L - l) % d].unfold(1, l, d).transpose(-1, -2))
        m, nc = l // d, (L - l) // d + 1
        return self.from_chunks(k[:, :(nc - 1 + m) * d].unflatten(1, (nc - 1 + m, d)).transpose(2, 3))

    def from_chunks(self, chunks: torch.Tensor) -> torch.Tensor:
        """``sequence`` from k's chunks of d = ``stride`` positions, chunks [B, n, H, d, D] (k
        [B, n * d, H, D] as ``k.unflatten(1, (n, d)).transpose(2, 3)``; d must divide the block
        l) -> [B, n - l/d + 1, H, D]. Contiguous chunks (a fused projection writes them so:
        ``RotaryEmbedding.split_columns``' ``chunks``) enter the GEMM without a copy."""
        l, d = self.block, self.stride
        B, n, H, _, D = chunks.shape
        if d is None or l % d or chunks.shape[3] != d:
            raise ValueError(f"MLPCompressor.from_chunks: chunks [B, n, H, d, D] of d = stride ({d}) positions, d "
                             f"dividing the block ({l}), got {tuple(chunks.shape)}")
        m = l // d
        nc = n - m + 1
        if nc <= 0:
            return chunks.new_zeros(B, 0, H, D)
        w1 = self.fc1.weight  # [hidden, l * D]: columns (chunk of the block, position in it, dim)
        hidden = w1.shape[0]
        # W1's rows as (unit, chunk j) rows of d * D columns: a view, no copy of the weight;
        # y's columns are (unit, j), part j every m-th
        y = F.linear(chunks.reshape(B, nc - 1 + m, H, d * D), w1.view(hidden * m, d * D)).unflatten(-1, (hidden, m))
        acc = torch.promote_types(chunks.dtype, torch.float32)  # no rounding between the parts
        w_pos = F.linear(self.pos.flatten().to(w1.dtype), w1)
        sums = chunks.sum(dim=3, dtype=acc)
        kernels = _phi_kernels_for(chunks)
        if kernels is not None:  # the same values, the elementwise tails one kernel each
            h = kernels.phi_hidden(y, self.fc1.bias, w_pos, nc, chunks.dtype)
            return kernels.phi_mean_out(sums, self.fc2(h), l)
        # (the bf16 product joins the fp32 bias exactly, as its fp32 copy would)
        pre = _shifted_sum(y.unbind(-1), nc, acc) + (self.fc1.bias.to(acc) + w_pos)
        h = F.silu(pre).to(chunks.dtype)
        mean = (_shifted_sum([sums] * m, nc, acc) / l).to(chunks.dtype)
        return mean + self.fc2(h)


def _shifted_sum(parts, n: int, dtype: torch.dtype) -> torch.Tensor:
    """sum_j parts[j][:, j:j + n] in ``dtype`` (part j: the j-th chunk of each block)."""
    out = parts[0][:, :n].to(dtype)
    for j in range(1, len(parts)):
        out = out + parts[j][:, j:j + n]
    return out


@functools.cache
def _phi_kernels():
    """The Triton kernels of phi's elementwise tails, or None where triton (or nsa_dist, in a
    to-hf export) is missing."""
    try:  # absolute: this module is also bundled into to-hf exports
        from nsa_dist.kernels import phi
    except ImportError:
        return None
    return phi


def _phi_kernels_for(k: torch.Tensor):
    """phi's kernels where they take k (CUDA, 16/32-bit), else None (the PyTorch lines)."""
    return _phi_kernels() if k.is_cuda and k.dtype != torch.float64 else None

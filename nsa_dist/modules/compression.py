"""phi: the learnable compression of a block of keys or values into one token."""
from __future__ import annotations

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """blocks [B, Nc, H, l, D] or (with ``stride``) a sequence [B, L, H, D] -> [B, Nc, H, D]."""
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
        chunks = k[:, :(nc - 1 + m) * d].unflatten(1, (nc - 1 + m, d)).transpose(2, 3)  # [B, nc+m-1, H, d, D]
        w1 = self.fc1.weight  # [hidden, l * D]: columns (position in the block, dim)
        hidden = w1.shape[0]
        w_chunks = w1.view(hidden, m, d * D).transpose(0, 1).reshape(m * hidden, d * D)
        y = F.linear(chunks.reshape(B, nc - 1 + m, H, d * D), w_chunks).unflatten(-1, (m, hidden))
        acc = torch.promote_types(k.dtype, torch.float32)  # no rounding between the parts
        bias = self.fc1.bias.to(acc) + F.linear(self.pos.flatten().to(w1.dtype), w1).to(acc)
        pre = _shifted_sum(y.unbind(3), nc, acc) + bias
        h = F.silu(pre).to(k.dtype)
        sums = chunks.sum(dim=3, dtype=acc)
        mean = (_shifted_sum([sums] * m, nc, acc) / l).to(k.dtype)
        return mean + self.fc2(h)


def _shifted_sum(parts, n: int, dtype: torch.dtype) -> torch.Tensor:
    """sum_j parts[j][:, j:j + n] in ``dtype`` (part j: the j-th chunk of each block)."""
    out = parts[0][:, :n].to(dtype)
    for j in range(1, len(parts)):
        out = out + parts[j][:, j:j + n]
    return out

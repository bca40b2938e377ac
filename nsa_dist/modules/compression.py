"""phi: the learnable compression of a block of keys or values into one token."""
from __future__ import annotations

import torch
from torch import nn


class MLPCompressor(nn.Module):
    """phi = mean pooling + MLP(block + intra-block position embedding), shared across heads.

    The MLP's last layer and the position embedding start at zero, so a fresh model
    compresses exactly by mean pooling (and a dense checkpoint imports cleanly); training
    moves it away from the mean. Input blocks [B, Nc, H, l, D] -> tokens [B, Nc, H, D].
    """

    def __init__(self, block: int, dim: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or max(dim, block * dim // 4)
        self.pos = nn.Parameter(torch.zeros(block, dim))
        self.fc1 = nn.Linear(block * dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        self.fc2.zero_init = True  # model-wide initialisation leaves it at zero

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        x = blocks + self.pos.to(blocks.dtype)
        h = torch.nn.functional.silu(self.fc1(x.flatten(-2)))
        return blocks.mean(dim=-2) + self.fc2(h)

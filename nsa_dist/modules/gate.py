"""The gate MLP: three sigmoid gates (cmp, sel, win) per query head."""
from __future__ import annotations

import torch
from torch import nn


class GateMLP(nn.Module):
    """x [B, S, hidden] -> gates [B, S, HQ, 3] in (0, 1).

    The last layer is zero-initialised, so every gate starts at sigmoid(0) = 0.5 and the
    three branches begin equally weighted.
    """

    def __init__(self, hidden_size: int, num_heads: int, gate_hidden: int = 0):
        super().__init__()
        self.num_heads = num_heads
        gate_hidden = gate_hidden or max(16, hidden_size // 4)
        self.fc1 = nn.Linear(hidden_size, gate_hidden)
        self.fc2 = nn.Linear(gate_hidden, num_heads * 3)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        self.fc2.zero_init = True  # model-wide initialisation leaves it at zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gates(self.fc1(x))

    def gates(self, pre: torch.Tensor) -> torch.Tensor:
        """The first layer's output [B, S, gate_hidden] (before its activation) -> gates
        [B, S, heads, 3] (heads: the rows of ``fc2`` this module holds, / 3)."""
        return self.output(torch.nn.functional.silu(pre))

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """The first layer's activation [B, S, gate_hidden] -> gates [B, S, heads, 3]."""
        return torch.sigmoid(self.fc2(h)).unflatten(-1, (-1, 3))

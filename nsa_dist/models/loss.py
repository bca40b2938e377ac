"""Token losses computed a chunk of positions at a time, so full-vocabulary logits never
exist for the whole sequence.

At long context the loss dominates activation memory: 128k local tokens x 32k vocabulary
is 8 GB of bf16 logits, 16 GB as fp32 for the softmax, and as much again for its gradient.
Each chunk's logits are made, reduced to per-token losses and dropped; under autograd the
chunk is checkpointed (recomputed in backward), so only one chunk's logits live at a time.
The sum is the same as the unchunked one up to the order of a float32 summation.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


def chunked_loss_sum(h: torch.Tensor, labels: torch.Tensor, chunk: int,
                     token_losses: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sum over positions of ``token_losses(h[i:j], labels[i:j])``, ``chunk`` positions at a time.

    h: [N, hidden] final hidden states (normed); labels: [N]; token_losses returns [n]
    float32 losses (zero where ignored). Every rank of a TP group must use the same chunk, as
    ``token_losses`` may hold collectives. Returns a float32 scalar.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if h.dim() != 2 or labels.shape != h.shape[:1]:
        raise ValueError(f"h must be [N, hidden] and labels [N], got {tuple(h.shape)} and {tuple(labels.shape)}")
    total = h.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled() and h.requires_grad

    def part(hc: torch.Tensor, lc: torch.Tensor) -> torch.Tensor:
        return token_losses(hc, lc).sum()

    for i in range(0, h.shape[0], chunk):
        hc, lc = h[i:i + chunk], labels[i:i + chunk]
        total = total + (checkpoint(part, hc, lc, use_reentrant=False) if grad else part(hc, lc))
    return total

"""Vocab-parallel cross-entropy: the logits stay split over TP, only [N] vectors are reduced."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..modules.comm import loss_precision
from . import collectives as C
from .comm_stats import Meter


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, group, meter, ignore_index):
        x = loss_precision(logits)
        m = x.max(dim=-1).values
        C.all_reduce_(m, group, meter, "fwd", op=dist.ReduceOp.MAX)
        x = x - m[:, None]
        V_local = x.shape[-1]
        local_t = target - vocab_start
        inside = (local_t >= 0) & (local_t < V_local) & (target != ignore_index)
        safe_t = local_t.clamp(0, V_local - 1)
        picked = x.gather(1, safe_t[:, None]).squeeze(1) * inside
        e = x.exp()
        sum_exp = e.sum(-1)
        both = torch.stack([picked, sum_exp])  # one all-reduce for the two [N] vectors
        C.all_reduce_(both, group, meter, "fwd")
        picked, sum_exp = both[0], both[1]
        valid = target != ignore_index
        loss = (sum_exp.log() - picked) * valid
        ctx.save_for_backward(e / sum_exp[:, None], safe_t, inside, valid)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, safe_t, inside, valid = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(1, safe_t[:, None], -inside.to(grad.dtype)[:, None])
        grad *= (g * valid)[:, None]
        return grad.to(ctx.in_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int,
                                 group, meter: Optional[Meter] = None,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss over logits split along the vocabulary.

    logits: [N, V/t] this rank's vocabulary slice [vocab_start, vocab_start + V/t);
    target: [N] global token ids (``ignore_index`` ignored). Returns [N] float32 losses
    (float64 for float64 logits),
    zero at ignored positions, identical on every rank of ``group``.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, V_local] and target [N], got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    return _VocabParallelCE.apply(logits, target.long(), vocab_start, group, meter, ignore_index)

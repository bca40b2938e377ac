"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr``.

A pure function of the step, so resuming needs no scheduler state: the trainer sets the
rate of every parameter group before each optimizer step.
"""
from __future__ import annotations

import math


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Steps 0..warmup-1 ramp linearly from lr/warmup to lr; the next ``decay_steps`` steps
    follow half a cosine from lr to min_lr; later steps stay at min_lr.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if decay_steps <= 0:
        return lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def schedule_from_config(cfg) -> "callable":
    """step -> lr for a TrainConfig (decay_steps 0 means: decay over the rest of training)."""
    decay = cfg.decay_steps or max(1, cfg.train_steps - cfg.warmup_steps)
    return lambda step: lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, decay)

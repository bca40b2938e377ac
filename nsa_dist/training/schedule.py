"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr``.

A pure function of the step, so resuming needs no scheduler state: the trainer sets the
rate of every parameter group before each optimizer step. A run resumed with another
``train_steps`` (or other schedule fields) continues the checkpoint's schedule, holding
``min_lr`` past its end (``schedule_on_resume: keep``, the default), or re-plans it from the
new config (``replan``: the lr may jump at the resume step); ``resume.plan_schedule`` decides
and says which at start.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


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


@dataclass(frozen=True)
class Schedule:
    """One resolved schedule (``decay_steps`` > 0); called with a step it gives the lr.
    Recorded in every checkpoint (``lr_schedule``) so that a resumed run can continue it."""

    lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int

    def __call__(self, step: int) -> float:
        return lr_at(step, self.lr, self.min_lr, self.warmup_steps, self.decay_steps)

    @property
    def end(self) -> int:
        """The first step at min_lr."""
        return self.warmup_steps + self.decay_steps

    def describe(self) -> str:
        return (f"warm-up {self.warmup_steps} steps to {self.lr:.2e}, cosine to {self.min_lr:.2e} "
                f"until step {self.end}, then {self.min_lr:.2e}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        return cls(float(d["lr"]), float(d["min_lr"]), int(d["warmup_steps"]), int(d["decay_steps"]))

    @classmethod
    def from_train_config(cls, tc) -> "Schedule":
        """From a TrainConfig or its dict (decay_steps 0: decay over the rest of training)."""
        get = (lambda k: tc[k]) if isinstance(tc, dict) else (lambda k: getattr(tc, k))
        warmup = int(get("warmup_steps"))
        return cls(float(get("lr")), float(get("min_lr")), warmup,
                   int(get("decay_steps")) or max(1, int(get("train_steps")) - warmup))


def schedule_from_config(cfg) -> Schedule:
    """step -> lr for a TrainConfig (decay_steps 0 means: decay over the rest of training)."""
    return Schedule.from_train_config(cfg)

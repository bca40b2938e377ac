"""Pretraining on DeepSpeed: config, LR schedule, checkpoints, metrics, TensorBoard, trainer.

Nothing heavy is imported here: ``Trainer`` (DeepSpeed) and ``TBLogger`` (TensorBoard)
load on first use.
"""
import importlib

_NAMES = {"TrainConfig": "config", "lr_at": "schedule", "Trainer": "trainer",
          "CheckpointManager": "checkpoint", "find_resume_checkpoint": "checkpoint",
          "verify_checkpoint": "checkpoint", "TBLogger": "tensorboard", "Progress": "progress"}


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_NAMES)

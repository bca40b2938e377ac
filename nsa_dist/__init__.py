"""nsa_dist: Native Sparse Attention for Megatron-style distributed pretraining.

Importing the package loads only torch and PyYAML; DeepSpeed, Triton, TensorBoard and
sentencepiece are imported by the parts that need them.
"""
from .config import ModelConfig, NSAConfig

__version__ = "0.1.0"


def __getattr__(name):
    # Modules with heavier imports load on first use.
    if name in ("NSAAttention", "AttentionStats"):
        from . import modules
        return getattr(modules, name)
    if name in ("NSADecoderLM", "LMOutput"):
        from . import models
        return getattr(models, name)
    raise AttributeError(f"module 'nsa_dist' has no attribute {name!r}")


__all__ = ["ModelConfig", "NSAConfig", "NSAAttention", "AttentionStats", "NSADecoderLM", "LMOutput"]

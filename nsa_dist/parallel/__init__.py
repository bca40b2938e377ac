"""Tensor, Megatron-sequence and Ulysses parallelism for NSA models (docs/parallelism.md).

Build one ``ParallelState(world_size, rank, tp, sp, dp)`` after
``torch.distributed.init_process_group`` and pass it explicitly; ``parallelize(model, state)``
shards the model in place (the plan: parallelize.py; the hooks it gives the layers:
hooks.py); ``state.mpu()`` goes to ``deepspeed.initialize(mpu=...)``.
"""
from .comm_stats import CommStats, Meter, wire_bytes
from .cross_entropy import vocab_parallel_cross_entropy
from .hooks import AttentionPlanComm, LMPlanComm, TPRegion
from .layers import shard_columnwise_, shard_param, shard_rowwise_, vocab_parallel_embedding
from .parallelize import (ParallelNSAAttention, gather_full, grad_norm, parallelize, parallelize_attention,
                          sync_grads)
from .state import (DeepSpeedMPU, HeadLayout, Layout, ParallelConfig, ParallelState, check_layout,
                    check_model_layout)

__all__ = [
    "AttentionPlanComm", "CommStats", "DeepSpeedMPU", "HeadLayout", "LMPlanComm", "Layout", "Meter",
    "ParallelConfig", "ParallelNSAAttention", "ParallelState", "TPRegion", "check_layout",
    "check_model_layout", "gather_full", "grad_norm", "parallelize", "parallelize_attention",
    "shard_columnwise_", "shard_param", "shard_rowwise_", "sync_grads", "vocab_parallel_cross_entropy",
    "vocab_parallel_embedding", "wire_bytes",
]

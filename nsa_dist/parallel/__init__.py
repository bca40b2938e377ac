"""Tensor, Megatron-sequence and Ulysses parallelism for NSA models (docs/parallelism.md).

Build one ``ParallelState(world_size, rank, tp, sp, dp)`` after
``torch.distributed.init_process_group`` and pass it explicitly; ``parallelize(model, state)``
returns the parallel model; ``state.mpu()`` goes to ``deepspeed.initialize(mpu=...)``.
"""
from .comm_stats import CommStats, Meter, wire_bytes
from .cross_entropy import vocab_parallel_cross_entropy
from .dense_parallel import ParallelDenseAttention
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from .nsa_parallel import HeadLayout, ParallelNSAAttention
from .parallelize import ParallelDecoderLM, gather_full, grad_norm, parallelize, sync_grads
from .state import (DeepSpeedMPU, Layout, ParallelConfig, ParallelState, check_layout,
                    check_model_layout)

__all__ = [
    "ColumnParallelLinear", "CommStats", "DeepSpeedMPU", "HeadLayout", "Layout", "Meter",
    "ParallelConfig", "ParallelDecoderLM", "ParallelDenseAttention", "ParallelNSAAttention", "ParallelState", "RowParallelLinear",
    "VocabParallelEmbedding", "check_layout", "check_model_layout", "gather_full", "grad_norm", "parallelize",
    "sync_grads", "vocab_parallel_cross_entropy", "wire_bytes",
]

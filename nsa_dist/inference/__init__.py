"""Inference: per-branch KV caches, prefill + one-step decode (PyTorch or the Triton decode
kernels, optionally replayed as a CUDA graph), sampling, read counters.

Prompts in a batch are right-padded (every sequence starts at position 0) with their
lengths given separately; see docs/inference.md.
"""
from .cache import LayerCache
from .counters import DecodeReads, dense_reads, expected_reads, sel_reads_from_indices, seed_reads, step_reads
from .decode import (ModelCache, StepStats, attend_step, decode_layer, decode_step, prefill,
                     prefill_layer, select_step)
from .generate import GenerateOutput, generate, sample_next
from .graphs import GraphedDecodeStep
from .kernel_step import decode_kernels

__all__ = [
    "DecodeReads", "GenerateOutput", "GraphedDecodeStep", "LayerCache", "ModelCache", "StepStats",
    "attend_step", "decode_kernels", "decode_layer", "decode_step", "dense_reads", "expected_reads",
    "generate", "prefill", "prefill_layer", "sample_next", "sel_reads_from_indices", "seed_reads",
    "select_step", "step_reads",
]

"""The model's decode step captured in a CUDA graph: one replay per step.

A step on the decode kernels has no host sync and sizes every launch from shapes only
(batch, cache capacity), so the whole step (embedding, projections, append, the decode
kernels, MLPs, head) can be captured once and replayed with new tokens. The graph reads and
writes the caches' tensors in place, so it serves the ModelCache it was captured with, at
its batch and capacity; the capacity check stays on the host, before each replay.
"""
from __future__ import annotations

import torch

from .counters import step_reads
from .decode import ModelCache, StepStats, check_model_step, model_step
from .kernel_step import decode_kernels


class GraphedDecodeStep:
    """``decode_step(model, cache, tokens)`` as one CUDA-graph replay.

    Capture runs ``warmup`` steps first (kernel compilation, library handles) on a side
    stream, each writing the K/V of a placeholder token at the sequences' current positions
    and then resetting the lengths: those slots are exactly the ones the next real step
    overwrites, so the caches are left as they were for every position a query can see.
    Returned logits live in the graph's static buffer (overwritten by the next call).
    """

    def __init__(self, model, cache: ModelCache, count_reads: bool = True, warmup: int = 2):
        device = model.embed.weight.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {device}")
        self.kernels = decode_kernels("triton", device, model.embed.weight.dtype)
        self.model, self.cache, self.count_reads = model, cache, count_reads
        self.tokens = torch.zeros(cache.layers[0].batch, 1, dtype=torch.long, device=device)
        check_model_step(model, cache, self.tokens)
        saved = [(c.lengths.clone(), c.host_max) for c in cache.layers]

        def restore():
            for c, (lengths, host) in zip(cache.layers, saved):
                c.lengths.copy_(lengths)
                c.host_max = host

        with torch.no_grad():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    model_step(model, cache, self.tokens, self.kernels, count_reads=False)
                    restore()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits, self.indices, _ = model_step(model, cache, self.tokens, self.kernels,
                                                          count_reads=False)
            restore()  # the capture advanced the host-side counts, not the device

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor):
        """tokens [B] or [B, 1] -> (logits [B, V] (static buffer), StepStats or None)."""
        tokens = check_model_step(self.model, self.cache, tokens)
        self.tokens.copy_(tokens)
        self.graph.replay()
        for c in self.cache.layers:
            c.host_max += 1
        if not self.count_reads:
            return self.logits, None
        return self.logits, StepStats([step_reads(idx, c.lengths, c.config)
                                       for idx, c in zip(self.indices, self.cache.layers)])

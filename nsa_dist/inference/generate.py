"""generate(): batched sampling (greedy, temperature, top-p) with a stop token.

Prompts of different lengths are right-padded: every sequence starts at position 0 and
sequence b decodes at its own position (``lengths[b]``), so no position offsets are needed
and the block geometry of NSA is the same as in training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from .decode import StepStats, decode_step, prefill
from .graphs import GraphedDecodeStep
from .kernel_step import decode_kernels


@dataclass
class GenerateOutput:
    """tokens: the new tokens of each sequence (stop token included when produced);
    finished: [B] bool, whether each stopped on the stop token;
    step_stats: one StepStats per decode step (the reads of each layer and branch; empty
    when generate() ran with count_reads=False)."""

    tokens: list[list[int]]
    finished: torch.Tensor
    step_stats: list[StepStats] = field(default_factory=list)


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    """ValueError naming the sampling parameter that is out of range."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 keeps every token), got {top_k!r}")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None, top_k: int = 0) -> torch.Tensor:
    """Next token per row of logits [B, V] -> LongTensor [B].

    temperature 0 is greedy (argmax); otherwise softmax(logits / temperature), restricted
    first to the top_k most likely tokens (0: all; ties with the k-th are kept), then to the
    smallest set of most likely tokens whose probability reaches top_p (at least one).
    """
    check_sampling(temperature, top_p, top_k)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _pad(prompts, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(prompts, torch.Tensor):
        raise TypeError("internal: tensors are handled by the caller")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the BOS token)")
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.as_tensor(list(p), dtype=torch.long, device=device)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    return ids, lengths


def _stepper(model, cache, backend: str, cuda_graphs: Optional[bool], count_reads: bool):
    """The decode step generate() uses: a CUDA-graph replay, or decode_step."""
    weight = model.embed.weight
    kernels = decode_kernels(backend, weight.device, weight.dtype)
    if cuda_graphs is None:
        cuda_graphs = kernels is not None and weight.device.type == "cuda"
    if cuda_graphs:
        if kernels is None or weight.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA model and the decode kernels (backend "
                             f"'auto' or 'triton'); got device {weight.device}, backend {backend!r}")
        return GraphedDecodeStep(model, cache, count_reads)
    return lambda tokens: decode_step(model, cache, tokens, backend, count_reads)


def _truncate(rows: list[list[int]], stop_token: Optional[int]) -> tuple[list[list[int]], torch.Tensor]:
    """Cut each row after its first stop token: (tokens, finished [B] bool)."""
    out, finished = [], []
    for row in rows:
        cut = row.index(stop_token) + 1 if stop_token is not None and stop_token in row else None
        out.append(row[:cut] if cut else row)
        finished.append(cut is not None)
    return out, torch.tensor(finished, dtype=torch.bool)


# How often (steps) generate() asks the GPU whether every sequence has stopped: each ask is a
# host sync, which would stop the host from queueing steps ahead.
STOP_CHECK_EVERY = 8


@torch.no_grad()
def generate(model, prompts: Union[Sequence[Sequence[int]], torch.Tensor], max_new_tokens: int,
             lengths: Optional[torch.Tensor] = None, temperature: float = 0.0, top_p: float = 1.0,
             stop_token: Optional[int] = None, pad_id: int = 0,
             generator: Optional[torch.Generator] = None, max_len: Optional[int] = None,
             backend: str = "auto", cuda_graphs: Optional[bool] = None,
             count_reads: bool = True, top_k: int = 0) -> GenerateOutput:
    """Sample up to ``max_new_tokens`` tokens after each prompt.

    prompts: a list of token-id lists (right-padded here), or a right-padded LongTensor
    [B, P] with ``lengths`` [B]. temperature, top_k, top_p: ``sample_next`` (temperature 0:
    greedy). A sequence stops after producing ``stop_token``; the others
    go on (finished sequences keep stepping, their tokens are dropped). max_len: cache
    capacity, default model.config.max_seq_len; longest prompt + max_new_tokens - 1 must fit.
    backend: "auto" (prefill through the layers' own forward, decode kernels on CUDA),
    "reference" (PyTorch decode) or "triton". cuda_graphs: replay each decode step as one
    CUDA graph (default: on with the kernels on CUDA). count_reads: keep each step's read
    counters in ``step_stats`` (off: nothing is counted).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    check_sampling(temperature, top_p, top_k)
    device = next(model.parameters()).device
    if isinstance(prompts, torch.Tensor):
        ids = prompts.to(device)
        if ids.dim() != 2:
            raise ValueError(f"prompt tensor must be [B, P], got shape {tuple(ids.shape)}")
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"prompt tensor must hold integer token ids, got dtype {ids.dtype}")
        lengths = (torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=device)
                   if lengths is None else lengths.to(device, torch.long))
    else:
        ids, lengths = _pad(prompts, pad_id, device)
    max_len = max_len or model.config.max_seq_len
    need = int(lengths.max()) + max_new_tokens - 1
    if need > max_len:
        raise ValueError(f"longest prompt ({int(lengths.max())}) + max_new_tokens ({max_new_tokens}) - 1 "
                         f"= {need} exceeds max_len={max_len}; lower max_new_tokens or raise max_len")
    was_training = model.training
    model.eval()
    try:
        last, cache = prefill(model, ids, lengths, max_len, all_logits=False)  # [B, V]
        B = ids.shape[0]
        step = _stepper(model, cache, backend, cuda_graphs, count_reads) if max_new_tokens > 1 else None
        new = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
        stopped = torch.zeros(B, dtype=torch.bool, device=device)
        stats, done = [], max_new_tokens
        for k in range(max_new_tokens):
            nxt = sample_next(last, temperature, top_p, generator, top_k)
            new[:, k] = nxt
            if stop_token is not None:
                stopped |= nxt == stop_token
                if k % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1 and bool(stopped.all()):
                    done = k + 1
                    break
            if k == max_new_tokens - 1:
                break
            last, st = step(nxt)
            if count_reads:
                stats.append(st)
        tokens, finished = _truncate(new[:, :done].tolist(), stop_token)
        return GenerateOutput(tokens, finished, stats)
    finally:
        model.train(was_training)

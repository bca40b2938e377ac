"""The to-hf export's ``generate()`` on nsa_dist's decode path (``convert/to_hf.py``).

The exported ``NSADistForCausalLM.generate()`` calls ``hf_generate`` whenever nsa_dist
imports. It translates the request (a transformers ``GenerationConfig`` and keyword
arguments) into ``generate()``'s arguments: the prompt is prefilled into per-branch caches
(the training kernels on CUDA) and decoded one token a step (the Triton decode kernels and
CUDA graphs on CUDA). It answers None, and the export runs transformers' own loop over its
bundled PyTorch model (the whole sequence again every step), when nsa_dist's path cannot
serve the request as asked:

- ``decode="auto"`` and no decode kernels for the model (not on CUDA, triton missing, fp64);
- a request ``generate()`` does not implement (beam search, logits processors, repetition
  penalties, several eos tokens, ...). With an explicit ``decode`` that is a ValueError
  naming the fields instead.

The result has transformers' layout: [B, P + T] token ids, the prompt rows as given (left
or right padded, ``attention_mask`` marks the real tokens), then the new tokens, with
``pad_token_id`` after a row's eos token; T is the longest row's count.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Optional

import torch

from .generate import generate
from .kernel_step import decode_kernels

DECODE_CHOICES = ("auto", "hf", "reference", "triton")

# GenerationConfig fields this path honours, and those it only accepts at their neutral value.
_USED = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_p", "top_k", "eos_token_id",
         "pad_token_id", "bos_token_id"}
_IGNORED = {"transformers_version", "_from_model_config", "use_cache", "cache_implementation",
            "early_stopping", "length_penalty", "_commit_hash"}  # bookkeeping, or beam search only
_NEUTRAL = {"num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "min_length": 0,
            "min_new_tokens": 0, "repetition_penalty": 1.0, "typical_p": 1.0, "no_repeat_ngram_size": 0,
            "encoder_no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "epsilon_cutoff": 0.0,
            "eta_cutoff": 0.0, "remove_invalid_values": False, "renormalize_logits": False,
            "return_dict_in_generate": False, "output_scores": False, "output_logits": False,
            "output_attentions": False, "output_hidden_states": False, "min_p": 0.0, "top_h": 0.0}


def _unsupported(gc, model_kwargs: dict) -> list[str]:
    """The request's fields that generate() does not implement."""
    bad = []
    for key, value in gc.to_diff_dict().items():
        if key in _USED or key in _IGNORED or value is None:
            continue
        if key not in _NEUTRAL or value != _NEUTRAL[key]:
            bad.append(f"{key}={value!r}")
    eos = gc.eos_token_id
    if isinstance(eos, (list, tuple)) and len(set(eos)) > 1:
        bad.append(f"eos_token_id={list(eos)} (one stop token only)")
    bad += [f"{k}=..." for k, v in model_kwargs.items() if k != "attention_mask" and v is not None]
    return bad


def _prompts(ids: torch.Tensor, mask: Optional[torch.Tensor]) -> list[list[int]]:
    """Each row's real tokens (attention_mask 1), left or right padding alike."""
    if mask is None:
        return ids.tolist()
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


@contextmanager
def _layer_backend(model, backend: str):
    """Every NSA layer's backend set to ``backend`` for the call (the export builds its layers
    on the reference; prefill through nsa_dist takes the training kernels on CUDA)."""
    layers = [b.attn for b in model.layers if hasattr(b.attn, "backend")]
    saved = [a.backend for a in layers]
    for a in layers:
        a.backend = backend
    try:
        yield
    finally:
        for a, b in zip(layers, saved):
            a.backend = b


def hf_generate(model, inputs: Optional[torch.Tensor], generation_config, model_generation_config,
                kwargs: dict, decode: str = "auto") -> Optional[torch.Tensor]:
    """transformers' ``generate(inputs, generation_config, **kwargs)`` of the export, on
    nsa_dist's decode path; None where transformers' own loop should run (module docstring).

    model: the export's NSADecoderLM (``NSADistForCausalLM.model``); inputs: input_ids
    [B, P] (or in kwargs); generation_config: the caller's (None: the model's,
    ``model_generation_config``); decode: "auto", "hf" (always None), "reference" or
    "triton" (``generate()``'s backend). Returns LongTensor [B, P + T].
    """
    if decode not in DECODE_CHOICES:
        raise ValueError(f"nsa_decode must be one of {DECODE_CHOICES}, got {decode!r}")
    if decode == "hf":
        return None
    weight = model.embed.weight
    if decode == "auto" and decode_kernels("auto", weight.device, weight.dtype) is None:
        return None  # no decode kernels here: transformers' loop
    gc = copy.deepcopy(generation_config if generation_config is not None else model_generation_config)
    if generation_config is not None and model_generation_config is not None:
        for key in _USED:  # unset fields come from the model's config, as in transformers
            if getattr(gc, key, None) is None:
                setattr(gc, key, getattr(model_generation_config, key, None))
    model_kwargs = gc.update(**kwargs)
    ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
    bad = _unsupported(gc, model_kwargs)
    if ids is None:
        bad.append("no input_ids (generation from bos alone)")
    if bad:
        if decode == "auto":
            return None
        raise ValueError(f"nsa_decode={decode!r} cannot serve {', '.join(bad)}; drop them or pass "
                         "nsa_decode='hf' (transformers' loop over the PyTorch model)")
    P = ids.shape[1]
    new = gc.max_new_tokens if gc.max_new_tokens is not None else (gc.max_length or 20) - P
    if new < 1:
        if decode == "auto":
            return None  # transformers warns and returns the prompt
        raise ValueError(f"nothing to generate: max_length={gc.max_length} <= prompt length {P}; "
                         "set max_new_tokens")
    eos = gc.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    pad = gc.pad_token_id if gc.pad_token_id is not None else eos
    sample = bool(gc.do_sample)
    prompts = _prompts(ids, model_kwargs.get("attention_mask"))
    with _layer_backend(model, "auto"):
        # cache sized to the request (not max_seq_len): transformers' loop has no cap either
        out = generate(model, prompts, new, temperature=(gc.temperature or 1.0) if sample else 0.0,
                       top_p=gc.top_p if sample and gc.top_p is not None else 1.0,
                       top_k=(50 if gc.top_k is None else gc.top_k) if sample else 0,
                       stop_token=eos, max_len=max(len(p) for p in prompts) + new - 1,
                       backend="triton" if decode == "auto" else decode, count_reads=False)  # auto: kernels found
    T = max(len(t) for t in out.tokens)
    tail = torch.full((len(prompts), T), pad if pad is not None else 0, dtype=ids.dtype, device=ids.device)
    for b, t in enumerate(out.tokens):
        tail[b, :len(t)] = torch.as_tensor(t, dtype=ids.dtype)
    return torch.cat([ids, tail], dim=1)

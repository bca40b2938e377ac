"""Shared helpers of the kernel tests: interpreter guard, comparisons with the reference."""
import os

import pytest
import torch


def kernels_or_skip():
    """(nsa_dist.kernels.api, device) under the interpreter (CPU) or on CUDA; skip when neither
    can run."""
    pytest.importorskip("triton")
    from nsa_dist.kernels import api as kernels
    from nsa_dist.kernels import range_attn

    interpreted = type(range_attn._range_fwd).__name__ == "InterpretedFunction"
    if not interpreted and not torch.cuda.is_available():
        pytest.skip("nsa_dist.kernels was imported before TRITON_INTERPRET=1 was set and there is "
                    "no CUDA device; run tests/ops on its own")
    return kernels, ("cpu" if interpreted or os.environ.get("TRITON_INTERPRET") == "1" else "cuda")


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(max |b|, 1e-6)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def record_descriptors(monkeypatch, module, name, seen: list):
    """Wrap ``module.name`` (a TMA descriptor helper) so that each call appends whether it made
    descriptors (True) or left the pointer loads (False)."""
    real = getattr(module, name)

    def recorded(*a, **kw):
        d = real(*a, **kw)
        seen.append(d[0] is not None)
        return d
    monkeypatch.setattr(module, name, recorded)

"""The decode step on the Triton decode kernels (``nsa_dist.kernels.decode``).

Same contract as the PyTorch path (``LayerCache.append`` then ``attend_step``): one new
token per sequence, appended at position lengths[b], then the three branches for its query.
Nothing here syncs with the host or sizes a launch from the lengths, so a step can be
captured in a CUDA graph (``graphs.py``); the capacity check runs on the host-side count.
"""
from __future__ import annotations

from typing import Optional

import torch

from .cache import LayerCache, Phi

BACKENDS = ("auto", "reference", "triton")


def decode_kernels(backend: str, device: torch.device, dtype: torch.dtype):
    """The decode kernel module for ``backend``, or None for the PyTorch path.

    "auto": the kernels on CUDA (fp16/bf16/fp32, when triton imports), PyTorch elsewhere;
    "reference": PyTorch; "triton": the kernels (CUDA, or the CPU under TRITON_INTERPRET=1).
    """
    from ..ops.api import load_kernels, resolve_backend

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if dtype == torch.float64 and backend == "triton":
        raise ValueError("the decode kernels take fp32, fp16 or bf16; use backend='reference' for fp64")
    if resolve_backend(backend, device, dtype) != "triton":
        return None
    load_kernels()  # a clear RuntimeError when triton or the kernels are missing
    from nsa_dist.kernels import decode  # by absolute name, like ops.api.load_kernels
    return decode


def append_step(kernels, cache: LayerCache, kv: dict[str, torch.Tensor], phi_k: Phi, phi_v: Phi) -> None:
    """``LayerCache.append`` on the kernels: kv holds ``k_sel, v_sel, k_win, v_win, k_raw,
    v_raw`` [B, H, D]. Mean pooling emits inside the append kernel; an MLP phi runs as
    masked tensor ops on every sequence (``LayerCache.emit``). Advances lengths by one."""
    cache.check_room()
    mean = phi_k is None and phi_v is None
    kernels.append_token(kv, cache.k_sel, cache.v_sel, cache.k_win, cache.v_win, cache.k_raw, cache.v_raw,
                         cache.k_cmp, cache.v_cmp, cache.lengths, cache.config, mean_pool=mean)
    if not mean:
        cache.emit(phi_k, phi_v, cache.lengths + 1)
    cache.advance()


def attend_step_kernels(kernels, q: torch.Tensor, gates: torch.Tensor, cache: LayerCache,
                        scale: Optional[float] = None, launch=None):
    """``attend_step`` on the kernels: q [B, HQ, Dk] (RoPE'd), gates [B, HQ, 3].

    Returns (o [B, HQ, Dv] fp32, indices [B, H, n] int64)."""
    sc = q.shape[-1] ** -0.5 if scale is None else scale
    return kernels.decode_attend(q, gates, cache.k_sel, cache.v_sel, cache.k_win, cache.v_win, cache.k_cmp,
                                 cache.v_cmp, cache.lengths, cache.config, sc,
                                 launch if launch is not None else kernels.DEFAULT_LAUNCH)

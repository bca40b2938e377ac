"""Input checks shared by every NSA backend: clear errors instead of wrong numbers."""
from __future__ import annotations

from typing import Optional

import torch

from ..config import NSAConfig
from .blocks import compressed_offsets, num_compressed

_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> list[int]:
    """cu_seqlens: [N+1] int32/int64, 0 first, non-decreasing, seq_len last, batch 1.
    Returns its values (read on the host: a GPU sync when cu_seqlens is a CUDA tensor)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got batch {batch}")
    c = cu_seqlens.tolist()
    if c[0] != 0 or c[-1] != seq_len:
        raise ValueError(f"cu_seqlens must start at 0 and end at the sequence length {seq_len}, got {c[0]}..{c[-1]}")
    if any(b < a for a, b in zip(c[:-1], c[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    return c


def check_query_range(q_start: int, num_queries: int, seq_len: int) -> None:
    """Queries at positions [q_start, q_start + num_queries) must lie in a key sequence of
    ``seq_len`` positions (``q_start`` an int: it shapes the computation on the host)."""
    if not isinstance(q_start, int) or isinstance(q_start, bool) or q_start < 0:
        raise ValueError(f"q_start must be a non-negative int (the first query's position in the key "
                         f"sequence), got {q_start!r}")
    if q_start + num_queries > seq_len:
        raise ValueError(f"queries at positions [{q_start}, {q_start + num_queries}) do not fit in the "
                         f"key sequence of length {seq_len}: q must be [B, Sq, HQ, Dk] with "
                         f"q_start + Sq <= S (S = k_sel.shape[1])")


def _check_tensor(name: str, t: torch.Tensor, dim: int = 4) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (fp64/fp32/bf16/fp16), got {t.dtype}")


def check_inputs(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, config: NSAConfig,
                 cu_seqlens: Optional[torch.Tensor], block_indices: Optional[torch.Tensor],
                 check_finite: bool, q_start: int = 0) -> None:
    """Validate shapes, dtypes, devices and values of ``nsa_attention``'s inputs. The Sq
    queries (gates, block_indices) are positions [q_start, q_start + Sq) of the S keys."""
    if not isinstance(config, NSAConfig):
        raise TypeError(f"config must be an NSAConfig, got {type(config).__name__}")
    named = dict(q=q, k_cmp=k_cmp, v_cmp=v_cmp, k_sel=k_sel, v_sel=v_sel, k_win=k_win,
                 v_win=v_win, gates=gates)
    for name, t in named.items():
        _check_tensor(name, t)
    B, Sq, HQ, Dk = q.shape
    S, H = k_sel.shape[1], k_sel.shape[2]
    Dv = v_sel.shape[3]
    check_query_range(q_start, Sq, S)
    if H == 0 or HQ % H != 0:
        raise ValueError(f"query heads ({HQ}) must be a multiple of KV heads ({H})")
    for name in ("k_sel", "k_win"):
        if named[name].shape != (B, S, H, Dk):
            raise ValueError(f"{name} must be [B, S, H, Dk] = {(B, S, H, Dk)}, got {tuple(named[name].shape)}")
    for name in ("v_sel", "v_win"):
        if named[name].shape != (B, S, H, Dv):
            raise ValueError(f"{name} must be [B, S, H, Dv] = {(B, S, H, Dv)}, got {tuple(named[name].shape)}")
    if cu_seqlens is not None:
        Nc = compressed_offsets(check_cu_seqlens(cu_seqlens, B, S), config)[-1]
    else:
        Nc = num_compressed(S, config)
    if k_cmp.shape != (B, Nc, H, Dk):
        raise ValueError(f"k_cmp must be [B, Nc, H, Dk] = {(B, Nc, H, Dk)} (Nc compressed tokens for "
                         f"S={S}, l={config.cmp_block}, d={config.cmp_stride}), got {tuple(k_cmp.shape)}")
    if v_cmp.shape != (B, Nc, H, Dv):
        raise ValueError(f"v_cmp must be [B, Nc, H, Dv] = {(B, Nc, H, Dv)}, got {tuple(v_cmp.shape)}")
    if gates.shape != (B, Sq, HQ, 3):
        raise ValueError(f"gates must be [B, Sq, HQ, 3] = {(B, Sq, HQ, 3)}, got {tuple(gates.shape)}")
    dtypes = {t.dtype for t in named.values()}
    if len(dtypes) != 1:
        raise TypeError(f"all inputs must share one dtype, got {sorted(str(d) for d in dtypes)}")
    devices = {t.device for t in named.values()}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    if block_indices is not None:
        if block_indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"block_indices must be an integer tensor, got {block_indices.dtype}")
        if block_indices.dim() != 4 or block_indices.shape[:3] != (B, Sq, H):
            raise ValueError(f"block_indices must be [B, Sq, H, n] with (B, Sq, H) = {(B, Sq, H)}, "
                             f"got {tuple(block_indices.shape)}")
    if check_finite:
        for name, t in named.items():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf values")

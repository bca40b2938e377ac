"""Public functions of the Triton kernels (``nsa_dist.kernels.api``; the folder has no
``__init__``: see ``nsa_dist/kernels/__init__.py``).

Same semantics as ``nsa_dist.ops`` with backend="reference" (SPEC.md): ``nsa_attention``
(forward and backward for q, all K/V and the gates) and ``select_blocks``. They run on CUDA
tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from torch.autograd.profiler import record_function

try:
    import triton  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("nsa_dist.kernels needs triton (pip install 'triton>=3.0')") from err

from .nsa import NSAFunction, make_geometry, pack, packed_select

__all__ = ["nsa_attention", "select_blocks"]

# A profiler range around the selection's kernels: launched from plain Python, outside any
# op, they would otherwise have no op in a torch.profiler trace to be charged to. Opened only
# while a profiler runs (a range is two more dispatched ops per call).
SELECT_RANGE = "nsa_dist::select_blocks"


def _select_range():
    return record_function(SELECT_RANGE) if torch.autograd._profiler_enabled() else nullcontext()


def _scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return float(q.shape[-1]) ** -0.5 if scale is None else float(scale)


def select_blocks(q: torch.Tensor, k_cmp: torch.Tensor, cfg, scale: Optional[float] = None,
                  cu_seqlens: Optional[torch.Tensor] = None, q_start: int = 0,
                  seq_len: Optional[int] = None) -> torch.Tensor:
    """Selected blocks per position and KV head, computed on the GPU.

    q: [B, S, HQ, Dk]; k_cmp: [B, Nc, H, Dk] (per document, concatenated, with cu_seqlens).
    q_start, seq_len: q's rows are positions [q_start, q_start + S) of sequences of
    ``seq_len`` positions (default S), whose compressed keys k_cmp are; cu_seqlens describes
    those (context parallelism's query chunk).
    Returns LongTensor [B, S, H, n], ascending, -1 padded (block indices from each document's
    start). Importance accumulates in fp32, so exact near-ties may break differently from the
    float64 reference.
    """
    B, S = q.shape[:2]
    with torch.no_grad(), _select_range():
        geo = make_geometry(q, k_cmp, k_cmp, cfg, cu_seqlens, q_start, seq_len)
        idx = packed_select(pack(q), pack(k_cmp), geo, cfg, _scale(q, scale))
    return idx.view(B, S, geo.H, cfg.num_selected)


def nsa_attention(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, cfg,
                  scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                  block_indices: Optional[torch.Tensor] = None, canonical: bool = False,
                  return_indices: bool = False, q_start: int = 0, forward_memo: Optional[dict] = None):
    """Gated NSA output [B, S, HQ, Dv] (differentiable in q, every K/V and the gates).

    q: [B, S, HQ, Dk]; k_cmp/v_cmp: [B, Nc, H, D] (already compressed); k_sel, v_sel, k_win,
    v_win: [B, S, H, D]; gates: [B, S, HQ, 3] (cmp, sel, win), already activated (>= 0:
    ``gates.combine_backward``).
    block_indices: optional [B, S, H, n] selection. When None the selection runs here from the
    compressed branch's forward, which the output reuses (one pass, not two).
    canonical: block_indices are the selection's own rows (ascending, distinct, -1 last, forced
    blocks present), which the kernels then rely on (``nsa.Geometry.forced_split``).
    return_indices: return (o, indices [B, S, H, n] LongTensor) instead of o.
    q_start: q and gates have Sq rows, positions [q_start, q_start + Sq) of the keys k_sel /
    k_win [B, S', H, D] (cu_seqlens and k_cmp describe those; o and the indices have Sq
    rows): a query chunk (context parallelism). The gradients of every key come back.
    forward_memo: a dict shared by a forward and its recomputation under activation
    checkpointing (``NSAFunction``): the recomputation skips the attention kernels.
    Inputs are expected validated by ``nsa_dist.ops.nsa_attention``.
    """
    B, S, HQ, _ = q.shape
    sc = _scale(q, scale)
    geo = make_geometry(q, k_cmp, v_sel, cfg, cu_seqlens, q_start, k_sel.shape[1])
    qp, kc, vc = pack(q), pack(k_cmp), pack(v_cmp)
    pre = None
    if forward_memo is not None and "branches" in forward_memo and block_indices is None:
        raise ValueError("forward_memo holds a forward's results: pass that forward's selection as "
                         "block_indices (the recomputation must attend with the same blocks)")
    if block_indices is None:
        with torch.no_grad(), _select_range():  # the compressed forward also feeds it
            idx, pre = packed_select(qp.detach(), kc.detach(), geo, cfg, sc, v_cmp=vc.detach())
        geo.idx_sorted = True  # the kernel's rows: distinct blocks, ascending, -1 last
        block_indices = idx.view(B, S, geo.H, -1)
    else:
        idx = block_indices.reshape(B * S, geo.H, -1)
        geo.idx_sorted = canonical
    o = NSAFunction.apply(qp, kc, vc, pack(k_sel), pack(v_sel), pack(k_win), pack(v_win),
                          pack(gates), idx.to(torch.int32).contiguous(), geo, cfg, sc, pre, forward_memo)
    o = o.view(B, S, HQ, -1)
    return (o, block_indices) if return_indices else o

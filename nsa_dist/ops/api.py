"""Public NSA functions: input checks, packed documents, and the choice of backend."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..config import NSAConfig
from . import reference
from .blocks import compressed_offsets, host_offsets, packed
from .validation import check_cu_seqlens, check_inputs, check_query_range

BACKENDS = ("auto", "reference", "triton")


def load_kernels():
    """The Triton kernels' public functions (``nsa_dist.kernels.api``), imported on demand:
    triton is optional. Imported by absolute name, so that the copy of this module bundled in a
    Hugging Face export uses an installed nsa_dist when there is one."""
    try:
        from nsa_dist.kernels import api
    except ImportError as err:  # triton missing, or nsa_dist installed without its kernels
        raise RuntimeError(
            "backend='triton' needs the nsa_dist.kernels package and triton "
            f"(pip install -e '.[gpu]'): {err}") from err
    return api


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """'auto' picks Triton on CUDA (when importable, not fp64), the reference elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the "
                               "CPU interpreter)")
        return backend
    if device.type == "cuda" and dtype != torch.float64:
        try:
            load_kernels()
            return "triton"
        except RuntimeError:
            return "reference"
    return "reference"


def _scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return float(q.shape[-1]) ** -0.5 if scale is None else float(scale)


def _documents(cu_seqlens: torch.Tensor, config: NSAConfig, q_start: int = 0, num_queries: Optional[int] = None):
    """(key slice, compressed-token slice, query-row slice, first query's position in the
    document) of each document holding some of the queries [q_start, q_start + num_queries)
    (all of them by default)."""
    c = cu_seqlens.tolist()
    cc = compressed_offsets(c, config)
    q_end = c[-1] if num_queries is None else q_start + num_queries
    out = []
    for i in range(len(c) - 1):
        a, b = max(c[i], q_start), min(c[i + 1], q_end)
        if a < b:
            out.append((slice(c[i], c[i + 1]), slice(cc[i], cc[i + 1]), slice(a - q_start, b - q_start), a - c[i]))
    return out


def kernels_take_query_offsets() -> bool:
    """Whether the Triton backend computes queries at an offset of the keys (``q_start``),
    which context parallelism needs; the reference always does. (Kept for callers that
    checked it: the kernels take offsets since their tile tables carry them.)"""
    return True


def select_blocks(q: torch.Tensor, k_cmp: torch.Tensor, config: NSAConfig,
                  scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                  reduce_importance=None, backend: str = "auto", q_start: int = 0,
                  seq_len: Optional[int] = None) -> torch.Tensor:
    """Selected blocks per query and KV head (SPEC: selection branch).

    q: [B, Sq, HQ, Dk]; k_cmp: [B, Nc, H, Dk] (compressed keys). Block indices count from
    each document's start when ``cu_seqlens`` is given.
    q_start, seq_len: the queries are positions [q_start, q_start + Sq) of a sequence of
    ``seq_len`` positions (default q_start + Sq; with ``cu_seqlens``, its last value), whose
    compressed keys are ``k_cmp`` (context parallelism: a rank's query chunk).
    reduce_importance: optional callable on the float64 group importance [B, T, H, Ns] of a
    query tile, applied before top-n (parallel layouts sum partial groups across ranks here);
    the reference computes it (the kernels cannot apply it).
    backend: "auto" (the kernels on CUDA, as ``nsa_attention``), "reference" or "triton".
    Returns LongTensor [B, S, H, n]: ascending, -1 padded, the same for every query head of
    a group.
    """
    if q.dim() != 4 or k_cmp.dim() != 4:
        raise ValueError(f"q must be [B, S, HQ, Dk] and k_cmp [B, Nc, H, Dk], got {tuple(q.shape)} "
                         f"and {tuple(k_cmp.shape)}")
    if q.shape[2] % k_cmp.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k_cmp.shape[2]})")
    if q.shape[3] != k_cmp.shape[3]:
        raise ValueError(f"q and k_cmp head dims differ: {q.shape[3]} vs {k_cmp.shape[3]}")
    sc = _scale(q, scale)
    Sq = q.shape[1]
    cu_seqlens = host_offsets(cu_seqlens)
    if cu_seqlens is not None:
        # the whole sequence: seq_len, else the queries' own (q_start = 0), else what it says
        want = seq_len if seq_len is not None else Sq if q_start == 0 else bounds_end(cu_seqlens)
        seq_len = check_cu_seqlens(cu_seqlens, q.shape[0], want)[-1]
    seq_len = q_start + Sq if seq_len is None else seq_len
    check_query_range(q_start, Sq, seq_len)
    cu_seqlens = packed(cu_seqlens)
    if resolve_backend(backend, q.device, q.dtype) == "triton" and reduce_importance is None:
        return load_kernels().select_blocks(q, k_cmp, config, sc, cu_seqlens, q_start, seq_len)
    if cu_seqlens is None:
        return reference.select_blocks_dense(q, k_cmp, config, sc, reduce_importance, q_start, seq_len)
    parts = [reference.select_blocks_dense(q[:, qs], k_cmp[:, cs], config, sc, reduce_importance, q0, ts.stop - ts.start)
             for ts, cs, qs, q0 in _documents(cu_seqlens, config, q_start, Sq)]
    return torch.cat(parts, dim=1)


def bounds_end(cu_seqlens: torch.Tensor) -> int:
    """The sequence length a (host) ``cu_seqlens`` describes: its last value."""
    return int(cu_seqlens[-1]) if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.numel() else -1


def nsa_attention(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, config: NSAConfig,
                  scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                  backend: str = "auto", block_indices: Optional[torch.Tensor] = None,
                  reduce_importance=None, canonical_indices: bool = False, return_indices: bool = False,
                  q_start: int = 0, forward_memo: Optional[dict] = None):
    """The NSA function: gated sum of compressed, selected and sliding-window attention.

    q: [B, S, HQ, Dk]; k_cmp/v_cmp: [B, Nc, H, Dk/Dv] (already compressed; packed per
    document with ``cu_seqlens``); k_sel/v_sel, k_win/v_win: [B, S, H, Dk/Dv];
    gates: [B, S, HQ, 3] (cmp, sel, win), already activated: >= 0 (SPEC's sigmoid; the Triton
    backward folds each gate into its branch's softmax statistics, and a negative gate gives NaN
    gradients there). scale defaults to Dk**-0.5.
    cu_seqlens: [N+1] int32/int64 document boundaries (B = 1); nothing crosses them. Its
    values are read on the host: a CPU tensor keeps the call free of GPU syncs, a CUDA one
    costs one copy to the host per call.
    block_indices: optional precomputed selection [B, S, H, n] (from ``select_blocks``). When
    None the blocks are selected inside, as ``select_blocks`` would; the Triton kernels then
    select from the compressed branch's own forward (one compressed pass for both), the
    layer's one call: ``o, idx = nsa_attention(..., return_indices=True)``.
    reduce_importance: as in ``select_blocks`` (parallel layouts sum partial importance across
    ranks). The fused kernel path cannot apply it: with the Triton backend the call then runs
    ``select_blocks`` (reference importance, reduced) and attends with its output.
    canonical_indices: block_indices are ``select_blocks``'s output for these inputs (rows
    ascending, distinct, -1 last, the forced blocks always present, as SPEC defines it). The
    Triton kernels then skip the row sort and run the forced blocks with full tiles. Other
    indices with this flag give wrong results.
    return_indices: return (o, indices): the selection attended, LongTensor [B, S, H, n]
    (block_indices itself when given).
    q_start: the queries are positions [q_start, q_start + Sq) of the key sequence: q, gates
    (and block_indices, the output, the indices) have Sq rows, k_sel/k_win S >= q_start + Sq,
    k_cmp the compressed tokens of all S (cu_seqlens describes the S keys). A rank's chunk
    under context parallelism; the result equals those rows of the full call, with either
    backend (the kernels' tile tables carry the offset).
    forward_memo: a dict shared by a forward and its recomputation under activation
    checkpointing. With the Triton backend the first call keeps the branches' outputs and
    log-sum-exps in it, and a call that finds them (same inputs, the first call's indices as
    block_indices) runs no attention kernel; the backward uses them. The reference ignores it
    (its recomputation runs the function again).
    Returns o [B, S, HQ, Dv] in q's dtype (differentiable in every floating input), or
    (o, indices) with ``return_indices``.
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    chosen = resolve_backend(backend, q.device, q.dtype)
    cu_seqlens = host_offsets(cu_seqlens)
    check_inputs(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, config, cu_seqlens,
                 block_indices, check_finite=(chosen == "reference"), q_start=q_start)
    cu_seqlens = packed(cu_seqlens)
    if canonical_indices and block_indices is None:
        raise ValueError("canonical_indices=True describes block_indices, but none were given: pass the "
                         "select_blocks output as block_indices, or drop the flag")
    sc = _scale(q, scale)
    if chosen == "triton":
        if reduce_importance is not None and block_indices is None:  # not in the fused path
            block_indices = select_blocks(q.detach(), k_cmp.detach(), config, sc, cu_seqlens, reduce_importance,
                                          backend="reference", q_start=q_start, seq_len=k_sel.shape[1])
            canonical_indices = True
        return load_kernels().nsa_attention(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, config,
                                            sc, cu_seqlens, block_indices, canonical_indices, return_indices,
                                            q_start, forward_memo)
    args = (q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates)
    if cu_seqlens is None:
        o, idx = reference.nsa_attention_dense(*args, config, sc, block_indices, reduce_importance, True, q_start)
    else:
        outs = []
        for ts, cs, qs, q0 in _documents(cu_seqlens, config, q_start, q.shape[1]):
            # q and gates by query rows, k_cmp/v_cmp by compressed tokens, the rest by keys
            doc = [t[:, qs] if i in (0, 7) else t[:, cs] if i in (1, 2) else t[:, ts] for i, t in enumerate(args)]
            part = None if block_indices is None else block_indices[:, qs]
            outs.append(reference.nsa_attention_dense(*doc, config, sc, part, reduce_importance, True, q0))
        o, idx = torch.cat([o for o, _ in outs], dim=1), torch.cat([i for _, i in outs], dim=1)
    if not return_indices:
        return o
    return o, (idx if block_indices is None else block_indices)

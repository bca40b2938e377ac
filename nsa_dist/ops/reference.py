"""Readable PyTorch reference of the NSA function (SPEC.md): the oracle for every kernel.

Vectorised over tokens and tiled over queries, so memory stays bounded at long context:
each tile of T queries scores against the compressed tokens, its selected blocks
(gathered) and its window band, never a full [S, S] matrix. Under autograd each tile is
checkpointed, so backward keeps only the inputs, not every tile's probabilities.

Shapes: q [B, S, HQ, Dk]; k_cmp/v_cmp [B, Nc, H, D]; k_sel, v_sel, k_win, v_win [B, S, H, D];
gates [B, S, HQ, 3]; query head g uses KV head g // G with G = HQ / H.
Positions are 0..S-1 here (queries may be a slice [q_start, q_start + Sq) of them); packed
documents are handled one by one by the caller (api.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

from ..config import NSAConfig
from .blocks import compressed_ends, num_sel_blocks, overlap_weights

# Elements of the largest per-tile intermediate: 2**24 fp32 values = 64 MiB on the CPU;
# GPUs have the memory for larger tiles and need them to amortise kernel launches.
_TILE_BUDGET = {"cpu": 1 << 24, "cuda": 1 << 27}

ImportanceReducer = Callable[[torch.Tensor], torch.Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax and accumulation run in fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tile_size(S: int, B: int, HQ: int, H: int, Dk: int, Dv: int, config: NSAConfig,
              device: torch.device = torch.device("cpu")) -> int:
    """Queries per tile so that the largest intermediate stays under the budget."""
    sel_keys = config.num_selected * config.sel_block
    per_query = max(B * H * sel_keys * (Dk + Dv),  # gathered selected K/V
                    B * HQ * sel_keys,  # selected scores
                    B * HQ * (S // config.cmp_stride + 1) * 2,  # compressed scores + p_slc
                    B * HQ * (config.window + 1))  # window scores (band)
    budget = _TILE_BUDGET.get(device.type, _TILE_BUDGET["cpu"])
    return int(max(16, min(S, budget // max(per_query, 1))))


# ----------------------------------------------------------------------------- compressed branch
def compressed_probs(q_t: torch.Tensor, k_cmp: torch.Tensor, t_pos: torch.Tensor,
                     config: NSAConfig, scale: float) -> torch.Tensor:
    """p_cmp for a tile of queries (Eq. 8), zero rows where no compressed token is visible.

    q_t: [B, T, HQ, Dk], k_cmp: [B, Nc, H, Dk], t_pos: [T] positions.
    Returns [B, H, G, T, Nc] in q_t's dtype.
    """
    B, T, HQ, Dk = q_t.shape
    Nc, H = k_cmp.shape[1], k_cmp.shape[2]
    qg = q_t.reshape(B, T, H, HQ // H, Dk)
    s = torch.einsum("bthgd,bnhd->bhgtn", qg, k_cmp) * scale
    visible = compressed_ends(Nc, config, q_t.device)[None, :] <= t_pos[:, None]  # [T, Nc]
    # Finite fill + multiply by the mask: rows with nothing visible give 0, never NaN,
    # and their gradient is 0 too.
    s = s.masked_fill(~visible, torch.finfo(s.dtype).min)
    return torch.softmax(s, dim=-1) * visible.to(s.dtype)


def compressed_attention(p: torch.Tensor, v_cmp: torch.Tensor) -> torch.Tensor:
    """o_cmp = p_cmp @ v_cmp. p: [B, H, G, T, Nc], v_cmp: [B, Nc, H, Dv] -> [B, T, H, G, Dv]."""
    return torch.einsum("bhgtn,bnhd->bthgd", p, v_cmp)


# ----------------------------------------------------------------------------- selection
def group_importance(p_cmp: torch.Tensor, Ns: int, config: NSAConfig) -> torch.Tensor:
    """Eq. 9 then Eq. 10: per-KV-head block importance, float64.

    p_cmp: [B, H, G, T, Nc] -> [B, T, H, Ns]. Summed in float64 so that partial group sums
    from several ranks (tensor / sequence parallel) round the same way as one device.
    """
    W = overlap_weights(p_cmp.shape[-1], Ns, config, p_cmp.device, torch.float64)
    p_slc = torch.matmul(p_cmp.to(torch.float64), W)  # [B, H, G, T, Ns]
    return p_slc.sum(dim=2).permute(0, 2, 1, 3)


def top_n_blocks(importance: torch.Tensor, t_pos: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """Deterministic top-n with forced blocks (SPEC: selection branch).

    importance: [B, T, H, Ns]; t_pos: [T]. Candidates j*l' <= t; block 0 and the local
    blocks floor(t/l'), floor(t/l')-1 are forced; the rest go by importance, ties to the
    lower index. Returns LongTensor [B, T, H, n], ascending, padded with -1.
    """
    n, ls = config.num_selected, config.sel_block
    B, T, H, Ns = importance.shape
    dev = importance.device
    j = torch.arange(Ns, device=dev)
    cur = (t_pos // ls)[:, None]
    candidate = j[None, :] <= cur  # j*l' <= t  <=>  j <= floor(t/l')
    forced = candidate & ((j[None, :] == 0) | (j[None, :] == cur) | (j[None, :] == cur - 1))
    score = importance.masked_fill(forced[None, :, None, :], float("inf"))
    score = score.masked_fill(~candidate[None, :, None, :], float("-inf"))
    # A stable descending sort keeps equal scores in index order: ties go to the lower block.
    top = torch.sort(score, dim=-1, descending=True, stable=True)
    k = min(n, Ns)
    idx, val = top.indices[..., :k], top.values[..., :k]
    idx = torch.where(val > float("-inf"), idx, torch.full_like(idx, Ns))
    idx = torch.sort(idx, dim=-1).values
    idx = torch.where(idx == Ns, torch.full_like(idx, -1), idx)
    if k < n:
        idx = torch.cat([idx, idx.new_full((B, T, H, n - k), -1)], dim=-1)
    return idx


def select_tile(q_t: torch.Tensor, k_cmp: torch.Tensor, t_pos: torch.Tensor, S: int,
                config: NSAConfig, scale: float,
                reduce_importance: Optional[ImportanceReducer] = None) -> torch.Tensor:
    """Selected blocks for a tile of queries: [B, T, H, n] (no gradient)."""
    with torch.no_grad():
        p = compressed_probs(q_t, k_cmp, t_pos, config, scale)
        imp = group_importance(p, num_sel_blocks(S, config), config)
        if reduce_importance is not None:
            imp = reduce_importance(imp)
        return top_n_blocks(imp, t_pos, config)


# Below this ratio of sequence length to selected keys per query, masking the whole causal
# prefix is cheaper than gathering blocks (one matrix product instead of a large copy).
DENSE_SELECTION_RATIO = 4


def selected_attention(q_t: torch.Tensor, k_sel: torch.Tensor, v_sel: torch.Tensor,
                       idx: torch.Tensor, t_pos: torch.Tensor, config: NSAConfig,
                       scale: float, dense_ratio: Optional[float] = None) -> torch.Tensor:
    """o_sel over the union of selected blocks, clamped to <= t.

    q_t: [B, T, HQ, Dk]; k_sel/v_sel: [B, S, H, D]; idx: [B, T, H, n]. Returns [B, T, H, G, Dv].
    Two equivalent layouts: short sequences mask the causal prefix by block membership;
    long ones gather only the selected blocks (memory and work ~ n*l' per query).
    """
    B, T, HQ, Dk = q_t.shape
    S, H, Dv = k_sel.shape[1], k_sel.shape[2], v_sel.shape[3]
    ls, n = config.sel_block, idx.shape[-1]
    Ns = num_sel_blocks(S, config)
    ratio = DENSE_SELECTION_RATIO if dense_ratio is None else dense_ratio
    if S <= ratio * n * ls:
        return _selected_attention_masked(q_t, k_sel, v_sel, idx, t_pos, ls, Ns, scale)
    pad = Ns * ls - S
    # [B, S, H, D] -> [B, H, Ns, l', D] so that a block index picks one contiguous block.
    kb = torch.nn.functional.pad(k_sel, (0, 0, 0, 0, 0, pad)).view(B, Ns, ls, H, Dk).permute(0, 3, 1, 2, 4)
    vb = torch.nn.functional.pad(v_sel, (0, 0, 0, 0, 0, pad)).view(B, Ns, ls, H, Dv).permute(0, 3, 1, 2, 4)
    ii = idx.permute(0, 2, 1, 3)  # [B, H, T, n]
    safe = ii.clamp(min=0)
    bi = torch.arange(B, device=q_t.device)[:, None, None, None]
    hi = torch.arange(H, device=q_t.device)[None, :, None, None]
    kg = kb[bi, hi, safe].reshape(B, H, T, n * ls, Dk)
    vg = vb[bi, hi, safe].reshape(B, H, T, n * ls, Dv)
    pos = safe[..., None] * ls + torch.arange(ls, device=q_t.device)  # [B, H, T, n, l']
    valid = (ii >= 0)[..., None] & (pos <= t_pos[None, None, :, None, None])
    valid = valid.reshape(B, H, T, 1, n * ls)
    qg = q_t.reshape(B, T, H, HQ // H, Dk).permute(0, 2, 1, 3, 4)  # [B, H, T, G, Dk]
    s = torch.matmul(qg, kg.transpose(-1, -2)) * scale  # [B, H, T, G, n*l']
    s = s.masked_fill(~valid, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1) * valid.to(s.dtype)
    o = torch.matmul(p, vg)  # [B, H, T, G, Dv]
    return o.permute(0, 2, 1, 3, 4)


def _selected_attention_masked(q_t, k_sel, v_sel, idx, t_pos, ls: int, Ns: int, scale: float):
    """selected_attention over keys 0..max(t) with a block-membership mask."""
    B, T, HQ, Dk = q_t.shape
    H = k_sel.shape[2]
    L = int(t_pos[-1]) + 1  # keys this tile can see
    member = torch.zeros(B, T, H, Ns + 1, dtype=torch.bool, device=q_t.device)
    member.scatter_(-1, torch.where(idx >= 0, idx, Ns), True)  # -1 padding lands in a spare slot
    k_pos = torch.arange(L, device=q_t.device)
    valid = member[..., k_pos // ls] & (k_pos[None, :] <= t_pos[:, None])[None, :, None]  # [B, T, H, L]
    qg = q_t.reshape(B, T, H, HQ // H, Dk)
    s = torch.einsum("bthgd,blhd->bhgtl", qg, k_sel[:, :L]) * scale
    valid = valid.permute(0, 2, 1, 3)[:, :, None]  # [B, H, 1, T, L]
    s = s.masked_fill(~valid, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1) * valid.to(s.dtype)
    return torch.einsum("bhgtl,blhd->bthgd", p, v_sel[:, :L])


# ----------------------------------------------------------------------------- sliding window
def window_attention(q_t: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, t0: int,
                     config: NSAConfig, scale: float) -> torch.Tensor:
    """o_win over positions max(0, t-w+1)..t. Returns [B, T, H, G, Dv] (zeros when w = 0)."""
    B, T, HQ, Dk = q_t.shape
    H, Dv = k_win.shape[2], v_win.shape[3]
    w = config.window
    if w == 0:
        return q_t.new_zeros(B, T, H, HQ // H, Dv)
    lo = max(0, t0 - w + 1)
    kw, vw = k_win[:, lo:t0 + T], v_win[:, lo:t0 + T]  # the band this tile can see
    t_pos = torch.arange(t0, t0 + T, device=q_t.device)[:, None]
    k_pos = torch.arange(lo, t0 + T, device=q_t.device)[None, :]
    valid = (k_pos <= t_pos) & (k_pos > t_pos - w)  # [T, L]
    qg = q_t.reshape(B, T, H, HQ // H, Dk)
    s = torch.einsum("bthgd,blhd->bhgtl", qg, kw) * scale
    s = s.masked_fill(~valid, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1) * valid.to(s.dtype)
    return torch.einsum("bhgtl,blhd->bthgd", p, vw)


# ----------------------------------------------------------------------------- whole function
def _tile_output(q_t, gates_t, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, idx, t0: int,
                 config: NSAConfig, scale: float) -> torch.Tensor:
    """Gated output of the three branches for queries t0 .. t0+T-1: [B, T, HQ, Dv]."""
    B, T, HQ, _ = q_t.shape
    t_pos = torch.arange(t0, t0 + T, device=q_t.device)
    o_cmp = compressed_attention(compressed_probs(q_t, k_cmp, t_pos, config, scale), v_cmp)
    o_sel = selected_attention(q_t, k_sel, v_sel, idx, t_pos, config, scale)
    o_win = window_attention(q_t, k_win, v_win, t0, config, scale)
    g = gates_t.reshape(B, T, o_cmp.shape[2], o_cmp.shape[3], 3, 1)
    o = g[..., 0, :] * o_cmp + g[..., 1, :] * o_sel + g[..., 2, :] * o_win
    return o.reshape(B, T, HQ, -1)


def select_blocks_dense(q: torch.Tensor, k_cmp: torch.Tensor, config: NSAConfig, scale: float,
                        reduce_importance: Optional[ImportanceReducer] = None, q_start: int = 0,
                        seq_len: Optional[int] = None) -> torch.Tensor:
    """select_blocks for one sequence (no packing): [B, Sq, HQ, Dk] -> [B, Sq, H, n].

    The queries are positions [q_start, q_start + Sq) of a sequence of ``seq_len`` positions
    (default q_start + Sq), whose compressed keys ``k_cmp`` are (context parallelism)."""
    B, Sq, HQ, Dk = q.shape
    S = q_start + Sq if seq_len is None else seq_len
    cdt = compute_dtype(q.dtype)
    qc, kc = q.to(cdt), k_cmp.to(cdt)
    T = tile_size(S, B, HQ, k_cmp.shape[2], Dk, Dk, config, q.device)
    out = []
    for t0 in range(0, Sq, T):
        t_pos = torch.arange(q_start + t0, q_start + min(Sq, t0 + T), device=q.device)
        out.append(select_tile(qc[:, t0:t0 + T], kc, t_pos, S, config, scale, reduce_importance))
    if not out:
        return torch.empty(B, 0, k_cmp.shape[2], config.num_selected, dtype=torch.long, device=q.device)
    return torch.cat(out, dim=1)


def nsa_attention_dense(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, config: NSAConfig,
                        scale: float, block_indices: Optional[torch.Tensor] = None,
                        reduce_importance: Optional[ImportanceReducer] = None, return_indices: bool = False,
                        q_start: int = 0):
    """NSA output for one sequence (no packing): [B, Sq, HQ, Dv] in q's dtype, and with
    ``return_indices`` the selection [B, Sq, H, n] it attended (computed here when
    ``block_indices`` is None). The queries (and gates) are positions [q_start, q_start + Sq)
    of the key sequence k_sel/k_win [B, S, H, D] (context parallelism; q_start = 0, Sq = S
    on one device)."""
    B, Sq, HQ, Dk = q.shape
    S, H, Dv = k_sel.shape[1], k_sel.shape[2], v_sel.shape[3]
    cdt = compute_dtype(q.dtype)
    q_c, g_c = q.to(cdt), gates.to(cdt)
    kv = [t.to(cdt) for t in (k_cmp, v_cmp, k_sel, v_sel, k_win, v_win)]
    T = tile_size(S, B, HQ, H, Dk, Dv, config, q.device)
    use_ckpt = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates))
    outs, idxs = [], []
    for t0 in range(0, Sq, T):
        q_t, g_t = q_c[:, t0:t0 + T], g_c[:, t0:t0 + T]
        p0 = q_start + t0  # position of the tile's first query
        if block_indices is None:
            t_pos = torch.arange(p0, p0 + q_t.shape[1], device=q.device)
            idx = select_tile(q_t, kv[0], t_pos, S, config, scale, reduce_importance)
        else:
            idx = block_indices[:, t0:t0 + T].long()
        if use_ckpt:
            o = checkpoint(_tile_output, q_t, g_t, *kv, idx, p0, config, scale, use_reentrant=False)
        else:
            o = _tile_output(q_t, g_t, *kv, idx, p0, config, scale)
        outs.append(o)
        idxs.append(idx)
    if not outs:
        o = q.new_zeros(B, 0, HQ, Dv)
        idx = torch.empty(B, 0, H, config.num_selected, dtype=torch.long, device=q.device)
    else:
        o, idx = torch.cat(outs, dim=1).to(q.dtype), torch.cat(idxs, dim=1)
    return (o, idx) if return_indices else o

"""Compressed-branch and sliding-window attention (Triton), forward and backward.

Both branches attend to a contiguous key range per query, so one kernel family serves both
(``MODE`` 0: compressed tokens, visible iff i*d + l - 1 <= t; ``MODE`` 1: the window
t-w+1..t). The selected branch's forced blocks are such ranges too, the same for every
query of a selection block, so they run here with full tiles (``MODE`` 2: block 0 and the
local blocks floor(t/l') - 1 and floor(t/l'), as two key kinds: ``_LOCAL``, the keys
l'*(floor(t/l') - 1)..t, and ``_FIRST``, block 0 for queries past the local blocks); the
sparse kernels then skip them. A program's rows are (position, query head) pairs of one KV head: BT positions x
G heads, so every GQA group size fills the matrix units and each K/V tile is loaded once for
the whole group. Softmax runs in base 2 with the scale folded in; the saved log-sum-exp is
base 2 as well (+inf for rows that see no key, which makes their probabilities exactly 0).
All token offsets are int64 (tile tables are int64), so 1M tokens x heads x dims is safe.
Positions are the keys' (tiles.py); a query's row is its position minus its tile's q_off
(0 unless the queries are a chunk of the keys: context parallelism).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .gates import gate_backward
from .headdim import rest_acc, rest_dot, rest_load, rest_scale, rest_store, rest_tma, rest_tma_rows, rest_zeros

LOG2E = 1.4426950408889634
TILE_COLS = tl.constexpr(8)  # columns of a tile table (tiles.COLS)


@triton.jit
def _nvis(tloc, L: tl.constexpr, DS: tl.constexpr):
    """Compressed tokens visible at local position tloc: i*DS + L - 1 <= tloc."""
    return tl.where(tloc >= L - 1, (tloc - (L - 1)) // DS + 1, 0)


@triton.jit
def _query_tile(TILES, tile):
    """Query tile ``tile``'s (t0, t1, ds0, cs0, q_off) (``tiles.py``): positions t0..t1-1 of the
    document from position ds0 (its compressed tokens from cs0), in query rows t - q_off."""
    row = TILES + tile * TILE_COLS
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 4), tl.load(row + 7)


_LOCAL = tl.constexpr(2)  # key kind: the local selection blocks of each query
_FIRST = tl.constexpr(3)  # key kind: selection block 0, for the queries it is not local to


@triton.jit
def _visible(c, tloc, row_hi, KIND: tl.constexpr, W: tl.constexpr, LS: tl.constexpr):
    """[rows, keys] mask: key c (local index of its kind) visible to local position tloc."""
    if KIND == 0:
        ok = c[None, :] < row_hi[:, None]
    elif KIND == 1:
        ok = (c[None, :] <= tloc[:, None]) & (c[None, :] > tloc[:, None] - W)
    elif KIND == 2:
        ok = (c[None, :] <= tloc[:, None]) & (c[None, :] // LS >= tloc[:, None] // LS - 1)
    else:
        ok = (tloc[:, None] // LS >= 2) & (c[None, :] < LS)
    return ok


@triton.jit
def _key_range(t0, t1, ds0, KIND: tl.constexpr, L: tl.constexpr, DS: tl.constexpr, W: tl.constexpr,
               LS: tl.constexpr):
    """(lo, hi): the keys of kind KIND that rows of positions t0..t1-1 (document start ds0) see."""
    if KIND == 0:
        lo = t0 * 0
        hi = _nvis(t1 - 1 - ds0, L, DS)
    elif KIND == 1:
        lo = tl.maximum(t0 - ds0 - W + 1, 0)
        hi = t1 - ds0
    elif KIND == 2:
        lo = tl.maximum((t0 - ds0) // LS - 1, 0) * LS
        hi = t1 - ds0
    else:
        lo = t0 * 0
        hi = tl.where((t1 - 1 - ds0) // LS >= 2, LS, 0)
    return lo, hi


@triton.jit
def _fwd_keys(acc, m_i, l_i, q, q_r, K, V, KD, VD, scale2, H, h, DK, DV, kbase, lo, hi, tloc, row_hi, dk, dv,
              KIND: tl.constexpr, W: tl.constexpr, LS: tl.constexpr, BLOCK_N: tl.constexpr,
              LSE_ONLY: tl.constexpr, PREC: tl.constexpr, BDK: tl.constexpr, BDK2: tl.constexpr,
              BDK3: tl.constexpr, TMA: tl.constexpr):
    """Online softmax over the keys lo..hi of one kind: the updated (acc, m, l). TMA: each key
    tile through the descriptors KD / VD ([T, H * D] boxes of BLOCK_N keys, ``tma.kv_descriptors``);
    keys past hi are read, then masked as invisible (beyond the tensor TMA reads zeros)."""
    for n0 in range(lo, hi, BLOCK_N):
        c = n0 + tl.arange(0, BLOCK_N)
        kr = (kbase + c) * H + h
        if TMA:
            k = tl.trans(KD.load([(kbase + n0).to(tl.int32), h * DK]))
            k_r = rest_tma(KD, (kbase + n0).to(tl.int32), h * DK, k, BDK, BDK2, BDK3, TRANS=True)
        else:
            k = tl.load(K + kr[None, :] * DK + dk[:, None], mask=(c < hi)[None, :] & (dk < DK)[:, None],
                        other=0.0)
            k_r = rest_load(K, kr, c < hi, DK, k, BDK, BDK2, BDK3, TRANS=True)
        s = rest_dot(tl.dot(q, k, input_precision=PREC), q_r, k_r, BDK2, BDK3, PREC) * scale2
        s = tl.where(_visible(c, tloc, row_hi, KIND, W, LS), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if not LSE_ONLY:
            if TMA:
                v = VD.load([(kbase + n0).to(tl.int32), h * DV])
            else:
                v = tl.load(V + kr[:, None] * DV + dv[None, :], mask=(c < hi)[:, None] & (dv < DV)[None, :],
                            other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_store(O, LSE, acc, m_i, l_i, rows, row_ok, dv, DV, LSE_ONLY: tl.constexpr):
    """A program's (o, lse) for its rows (empty rows: lse = +inf, o = 0)."""
    empty = l_i == 0.0
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + rows, lse, mask=row_ok)
    if not LSE_ONLY:
        o = acc / tl.where(empty, 1.0, l_i)[:, None]
        tl.store(O + rows[:, None] * DV + dv[None, :], o.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (dv < DV)[None, :])


@triton.jit
def _range_fwd(Q, K, V, O, LSE, TILES, KD, VD, K2, V2, O2, LSE2, KD2, VD2, scale2, HQ, DK, DV,
               G: tl.constexpr, MODE: tl.constexpr, L: tl.constexpr, DS: tl.constexpr,
               W: tl.constexpr, LS: tl.constexpr, BT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BDK: tl.constexpr, BDV: tl.constexpr, LSE_ONLY: tl.constexpr, PREC: tl.constexpr,
               BDK2: tl.constexpr, BDK3: tl.constexpr, TMA: tl.constexpr = False):
    """MODE 0 / 1 / 2: the compressed branch / the window / the forced selection blocks of
    (K, V) into (O, LSE). MODE 3: the window of (K, V) into (O, LSE), then the forced blocks of
    (K2, V2) (the selected branch's keys, descriptors KD2 / VD2) into (O2, LSE2), one launch
    for both (``launch.window_forced``: q is loaded once); else K2 ... VD2 are unused."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    H = HQ // G
    t0, t1, ds0, cs0, q_off = _query_tile(TILES, tile)  # position t is query row t - q_off
    Q -= q_off * (HQ * DK)
    O -= q_off * (HQ * DV)
    LSE -= q_off * HQ
    r = tl.arange(0, BLOCK_M)
    t = t0 + r // G
    head = h * G + r % G
    row_ok = (r < BT * G) & (t < t1)
    tloc = t - ds0
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    q = tl.load(Q + (t * HQ + head)[:, None] * DK + dk[None, :],
                mask=row_ok[:, None] & (dk < DK)[None, :], other=0.0)
    q_r = rest_load(Q, t * HQ + head, row_ok, DK, q, BDK, BDK2, BDK3)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BDV], tl.float32)
    if MODE == 0:
        lo, hi = _key_range(t0, t1, ds0, 0, L, DS, W, LS)
        acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, q_r, K, V, KD, VD, scale2, H, h, DK, DV, cs0, lo, hi, tloc,
                                  _nvis(tloc, L, DS), dk, dv, 0, W, LS, BLOCK_N, LSE_ONLY, PREC, BDK, BDK2, BDK3, TMA)
    elif MODE == 1 or MODE == 3:
        lo, hi = _key_range(t0, t1, ds0, 1, L, DS, W, LS)
        acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, q_r, K, V, KD, VD, scale2, H, h, DK, DV, ds0, lo, hi, tloc, tloc,
                                  dk, dv, 1, W, LS, BLOCK_N, LSE_ONLY, PREC, BDK, BDK2, BDK3, TMA)
    if MODE == 3:  # the window's result, then the forced blocks of the second keys from scratch
        _fwd_store(O, LSE, acc, m_i, l_i, t * HQ + head, row_ok, dv, DV, LSE_ONLY)
        O = O2 - q_off * (HQ * DV)
        LSE = LSE2 - q_off * HQ
        K, V, KD, VD = K2, V2, KD2, VD2
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BDV], tl.float32)
    if MODE >= 2:  # the forced selection blocks
        lo, hi = _key_range(t0, t1, ds0, _FIRST, L, DS, W, LS)
        acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, q_r, K, V, KD, VD, scale2, H, h, DK, DV, ds0, lo, hi, tloc, tloc,
                                  dk, dv, _FIRST, W, LS, BLOCK_N, LSE_ONLY, PREC, BDK, BDK2, BDK3, TMA)
        lo, hi = _key_range(t0, t1, ds0, _LOCAL, L, DS, W, LS)
        acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, q_r, K, V, KD, VD, scale2, H, h, DK, DV, ds0, lo, hi, tloc, tloc,
                                  dk, dv, _LOCAL, W, LS, BLOCK_N, LSE_ONLY, PREC, BDK, BDK2, BDK3, TMA)
    _fwd_store(O, LSE, acc, m_i, l_i, t * HQ + head, row_ok, dv, DV, LSE_ONLY)


@triton.jit
def _dq_keys(dq, dq_r, q, q_r, do, lse, delta, K, V, KD, VD, scale2, H, h, DK, DV, kbase, lo, hi, tloc, row_hi, dk,
             dv, KIND: tl.constexpr, W: tl.constexpr, LS: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
             BDK: tl.constexpr, BDK2: tl.constexpr, BDK3: tl.constexpr, TMA: tl.constexpr):
    """dq (unscaled; its first head-dim piece and the rest) plus one branch's sum over keys lo..hi of ds k,
    ds = p (do v - delta)."""
    for n0 in range(lo, hi, BLOCK_N):
        c = n0 + tl.arange(0, BLOCK_N)
        kr = (kbase + c) * H + h
        if TMA:  # as _fwd_keys
            k = KD.load([(kbase + n0).to(tl.int32), h * DK])
            v = tl.trans(VD.load([(kbase + n0).to(tl.int32), h * DV]))
            k_r = rest_tma(KD, (kbase + n0).to(tl.int32), h * DK, k, BDK, BDK2, BDK3)
        else:
            k = tl.load(K + kr[:, None] * DK + dk[None, :], mask=(c < hi)[:, None] & (dk < DK)[None, :],
                        other=0.0)
            v = tl.load(V + kr[None, :] * DV + dv[:, None], mask=(c < hi)[None, :] & (dv < DV)[:, None],
                        other=0.0)
            k_r = rest_load(K, kr, c < hi, DK, k, BDK, BDK2, BDK3)
        s = rest_dot(tl.dot(q, tl.trans(k), input_precision=PREC), q_r, k_r, BDK2, BDK3, PREC, TRANS_B=True) * scale2
        p = tl.where(_visible(c, tloc, row_hi, KIND, W, LS), tl.exp2(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, v, input_precision=PREC) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        dq_r = rest_acc(dq_r, ds.to(k.dtype), k_r, BDK2, BDK3, PREC)
    return dq, dq_r


@triton.jit
def _range_bwd_dq(Q, KC, VC, KW, VW, KS, VS, DO, LSEG, DELTA, R,
                  DQ, TILES, KCD, VCD, KWD, VWD, KSD, VSD, OC, OS, OW, GATES, RAW_C, RAW_S, RAW_W, DG,
                  scale2, scale, HQ, DK, DV, G: tl.constexpr,
                  L: tl.constexpr, DS: tl.constexpr,
                  W: tl.constexpr, LS: tl.constexpr, HAS_WIN: tl.constexpr, FORCED: tl.constexpr,
                  BT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BDK: tl.constexpr,
                  BDV: tl.constexpr, PREC: tl.constexpr, BDK2: tl.constexpr, BDK3: tl.constexpr,
                  TMA: tl.constexpr = False, GATE_STATS: tl.constexpr = False):
    """dq = scale * sum_keys ds k of the compressed branch, the window (HAS_WIN) and the
    selected branch's forced blocks (FORCED), each with its own lse / delta (LSEG / DELTA
    [3, R] fp32, rows 0 / 1 / 2 the compressed / selected / window branch's; the gate folded
    in: ``gates.combine_backward``) and the output's do, stored into the fp32 buffer DQ: the
    first writer of every row, so DQ needs no zeroing. One program loads q and do once and
    keeps one dq accumulator for all of them. GATE_STATS (``launch.gate_bwd_fused``): the
    program first computes its rows' gate backward itself (``gates.gate_backward`` from the branch
    outputs OC / OS / OW, GATES and the raw log-sum-exps RAW_*) and writes dg into DG and the
    (lse, delta) rows into LSEG / DELTA for the kernels after it, instead of reading them."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    H = HQ // G
    t0, t1, ds0, cs0, q_off = _query_tile(TILES, tile)
    r = tl.arange(0, BLOCK_M)
    t = t0 + r // G
    head = h * G + r % G
    row_ok = (r < BT * G) & (t < t1)
    tloc = t - ds0
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    rq = (t - q_off) * HQ + head  # query rows: positions - q_off
    q = tl.load(Q + rq[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk < DK)[None, :], other=0.0)
    q_r = rest_load(Q, rq, row_ok, DK, q, BDK, BDK2, BDK3)
    do_ptr = rq[:, None] * DV + dv[None, :]
    do_msk = row_ok[:, None] & (dv < DV)[None, :]
    dq = tl.zeros([BLOCK_M, BDK], tl.float32)
    dq_r = rest_zeros(BLOCK_M, dq, BDK2, BDK3)
    do = tl.load(DO + do_ptr, mask=do_msk, other=0.0)
    if GATE_STATS:  # the gate backward of these rows, written for the kernels after this one
        lse, delta, lse_s, delta_s, lse_w, delta_w = gate_backward(
            do.to(tl.float32), OC, OS, OW, RAW_C, RAW_S, RAW_W, GATES, DG, LSEG, DELTA, rq, row_ok, dv, DV, R, HAS_WIN)
    else:
        lse = tl.load(LSEG + rq, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + rq, mask=row_ok, other=0.0)
    lo, hi = _key_range(t0, t1, ds0, 0, L, DS, W, LS)
    dq, dq_r = _dq_keys(dq, dq_r, q, q_r, do, lse, delta, KC, VC, KCD, VCD, scale2, H, h, DK, DV, cs0, lo, hi, tloc,
                       _nvis(tloc, L, DS), dk, dv, 0, W, LS, BLOCK_N, PREC, BDK, BDK2, BDK3, TMA)
    if HAS_WIN:
        if GATE_STATS:
            lse, delta = lse_w, delta_w
        else:
            lse = tl.load(LSEG + 2 * R + rq, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + 2 * R + rq, mask=row_ok, other=0.0)
        lo, hi = _key_range(t0, t1, ds0, 1, L, DS, W, LS)
        dq, dq_r = _dq_keys(dq, dq_r, q, q_r, do, lse, delta, KW, VW, KWD, VWD, scale2, H, h, DK, DV, ds0, lo, hi,
                           tloc, tloc, dk, dv, 1, W, LS, BLOCK_N, PREC, BDK, BDK2, BDK3, TMA)
    if FORCED:
        if GATE_STATS:
            lse, delta = lse_s, delta_s
        else:
            lse = tl.load(LSEG + R + rq, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + R + rq, mask=row_ok, other=0.0)
        lo, hi = _key_range(t0, t1, ds0, _FIRST, L, DS, W, LS)
        dq, dq_r = _dq_keys(dq, dq_r, q, q_r, do, lse, delta, KS, VS, KSD, VSD, scale2, H, h, DK, DV, ds0, lo, hi,
                           tloc, tloc, dk, dv, _FIRST, W, LS, BLOCK_N, PREC, BDK, BDK2, BDK3, TMA)
        lo, hi = _key_range(t0, t1, ds0, _LOCAL, L, DS, W, LS)
        dq, dq_r = _dq_keys(dq, dq_r, q, q_r, do, lse, delta, KS, VS, KSD, VSD, scale2, H, h, DK, DV, ds0, lo, hi,
                           tloc, tloc, dk, dv, _LOCAL, W, LS, BLOCK_N, PREC, BDK, BDK2, BDK3, TMA)
    tl.store(DQ + rq[:, None] * DK + dk[None, :], dq * scale, mask=row_ok[:, None] & (dk < DK)[None, :])
    rest_store(DQ, rq, row_ok, DK, rest_scale(dq_r, scale, BDK2, BDK3), BDK, BDK2, BDK3)


@triton.jit
def dkdv_update(acc_k, acc_k_r, acc_v, pt, q, q_r, do, v, delta, BDK2: tl.constexpr, BDK3: tl.constexpr,
                PREC: tl.constexpr):
    """One step of a dK/dV kernel, keys x rows: given P^T (pt [keys, rows], masked), dV += P^T dO
    and dK += dS^T Q (unscaled; acc_k_r: dK's later head-dim pieces), dS^T = P^T * (V dO^T -
    delta). Returns (acc_k, acc_k_r, acc_v, dS^T) (the fused selected dq reuses dS)."""
    acc_v += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
    dst = pt * (dpt - delta[None, :])
    acc_k += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    acc_k_r = rest_acc(acc_k_r, dst.to(q.dtype), q_r, BDK2, BDK3, PREC)
    return acc_k, acc_k_r, acc_v, dst


@triton.jit
def _range_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DKo, DVo, TILES, QD, DOD, scale2, scale, HQ, DK, DV, QCHUNK,
                    G: tl.constexpr, MODE: tl.constexpr, L: tl.constexpr, DS: tl.constexpr,
                    W: tl.constexpr, LS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BDK: tl.constexpr, BDV: tl.constexpr, ATOMIC: tl.constexpr, PREC: tl.constexpr,
                    BDK2: tl.constexpr, BDK3: tl.constexpr, TMA: tl.constexpr = False):
    """One program per (key tile, chunk of QCHUNK query positions): stream the rows (position,
    head) of the chunk that can see the tile. A compressed key is seen by every later query,
    so without chunks the first tiles' programs stream the whole document while the grid is
    only Nc/BLOCK_N x H wide; with chunks (ATOMIC) the partial sums add into fp32 DKo/DVo.
    MODE 0 compressed, 1 window, _LOCAL / _FIRST the selected branch's forced keys (tiles of
    block 0 only for _FIRST, whose queries are those past the local blocks).
    TMA: a step's q / dO rows (BLOCK_M // G positions x the G heads) as one box of the
    descriptors QD / DOD ([Tq, HQ, D], ``tma.row_descriptors``); rows past the chunk are read,
    then masked."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    chunk = tl.program_id(2)
    H = HQ // G
    a0 = tl.load(TILES + tile * TILE_COLS)
    a1 = tl.load(TILES + tile * TILE_COLS + 1)
    ds0 = tl.load(TILES + tile * TILE_COLS + 2)
    de0 = tl.load(TILES + tile * TILE_COLS + 3)
    cs0 = tl.load(TILES + tile * TILE_COLS + 4)
    q_a = tl.load(TILES + tile * TILE_COLS + 5)  # the document's queries: positions q_a..q_b-1,
    q_b = tl.load(TILES + tile * TILE_COLS + 6)  # in rows position - q_off (a query chunk: some of
    q_off = tl.load(TILES + tile * TILE_COLS + 7)  # the keys' positions; otherwise all of them)
    c = a0 + tl.arange(0, BLOCK_N)
    key_ok = c < a1
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    kr = c * H + h
    k = tl.load(K + kr[:, None] * DK + dk[None, :], mask=key_ok[:, None] & (dk < DK)[None, :], other=0.0)
    k_r = rest_load(K, kr, key_ok, DK, k, BDK, BDK2, BDK3)
    v = tl.load(V + kr[:, None] * DV + dv[None, :], mask=key_ok[:, None] & (dv < DV)[None, :], other=0.0)
    doc_len = de0 - ds0
    if MODE == 0:
        cloc = c - cs0
        q_lo = (a0 - cs0) * DS + L - 1
        q_hi = doc_len
    elif MODE == 1:
        cloc = c - ds0
        q_lo = a0 - ds0
        q_hi = tl.minimum(doc_len, a1 - ds0 - 1 + W)
    elif MODE == 2:
        cloc = c - ds0
        q_lo = a0 - ds0
        q_hi = tl.minimum(doc_len, ((a1 - ds0 - 1) // LS + 2) * LS)
    else:
        cloc = c - ds0
        q_lo = a0 * 0 + 2 * LS
        q_hi = doc_len
    q_lo = tl.maximum(q_lo, chunk * QCHUNK)
    q_hi = tl.minimum(q_hi, (chunk + 1) * QCHUNK)
    q_lo = tl.maximum(q_lo, q_a - ds0)
    q_hi = tl.minimum(q_hi, q_b - ds0)
    acc_k = tl.zeros([BLOCK_N, BDK], tl.float32)
    acc_k_r = rest_zeros(BLOCK_N, acc_k, BDK2, BDK3)
    acc_v = tl.zeros([BLOCK_N, BDV], tl.float32)
    for r0 in range(q_lo * G, q_hi * G, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        row_ok = r < q_hi * G
        tloc = r // G
        rq = (ds0 + tloc - q_off) * HQ + h * G + r % G
        if TMA:
            p0 = (ds0 + r0 // G - q_off).to(tl.int32)
            q = tl.reshape(QD.load([p0, h * G, 0]), [BLOCK_M, BDK])
            q_r = rest_tma_rows(QD, p0, h * G, q, BLOCK_M, BDK, BDK2, BDK3)
            do = tl.reshape(DOD.load([p0, h * G, 0]), [BLOCK_M, BDV])
        else:
            q = tl.load(Q + rq[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk < DK)[None, :], other=0.0)
            q_r = rest_load(Q, rq, row_ok, DK, q, BDK, BDK2, BDK3)
            do = tl.load(DO + rq[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv < DV)[None, :],
                         other=0.0)
        lse = tl.load(LSE + rq, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + rq, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PREC)
        st = rest_dot(st, k_r, q_r, BDK2, BDK3, PREC, TRANS_B=True) * scale2  # [BLOCK_N, BLOCK_M]
        if MODE == 0:
            ok = cloc[:, None] * DS + (L - 1) <= tloc[None, :]
        elif MODE == 1:
            ok = (cloc[:, None] <= tloc[None, :]) & (cloc[:, None] > tloc[None, :] - W)
        elif MODE == 2:
            ok = (cloc[:, None] <= tloc[None, :]) & (cloc[:, None] // LS >= tloc[None, :] // LS - 1)
        else:
            ok = cloc[:, None] < LS
        ok = ok & key_ok[:, None] & row_ok[None, :]
        pt = tl.where(ok, tl.exp2(st - lse[None, :]), 0.0)
        acc_k, acc_k_r, acc_v, _ = dkdv_update(acc_k, acc_k_r, acc_v, pt, q, q_r, do, v, delta, BDK2, BDK3, PREC)
    acc_k_r = rest_scale(acc_k_r, scale, BDK2, BDK3)
    if ATOMIC:
        if q_hi > q_lo:  # chunks before the tile's first query add nothing
            tl.atomic_add(DKo + kr[:, None] * DK + dk[None, :], acc_k * scale,
                          mask=key_ok[:, None] & (dk < DK)[None, :], sem="relaxed")
            rest_store(DKo, kr, key_ok, DK, acc_k_r, BDK, BDK2, BDK3, ATOMIC=True)
            tl.atomic_add(DVo + kr[:, None] * DV + dv[None, :], acc_v,
                          mask=key_ok[:, None] & (dv < DV)[None, :], sem="relaxed")
    else:
        tl.store(DKo + kr[:, None] * DK + dk[None, :], (acc_k * scale).to(DKo.dtype.element_ty),
                 mask=key_ok[:, None] & (dk < DK)[None, :])
        rest_store(DKo, kr, key_ok, DK, acc_k_r, BDK, BDK2, BDK3)
        tl.store(DVo + kr[:, None] * DV + dv[None, :], acc_v.to(DVo.dtype.element_ty),
                 mask=key_ok[:, None] & (dv < DV)[None, :])

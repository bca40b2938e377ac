"""Selected-block attention (Triton), forward and backward, any GQA group size.

Position-major forward and dq (G >= 16, or forced): a program takes BT positions x G query
heads of one KV head (at least 16 rows, so the matrix units are used even for G = 1, 2, 4,
8) and walks the *union* of the blocks its positions chose (``tiles.selection_union``); a row
only counts the keys of blocks its own position chose, clamped to <= t. With G >= 16 a tile
is one position and the union is its own list (the paper's group-centric kernel).
dK/dV: the selection is inverted (``tiles.inverted_selection``, on the device): one program per
(KV head, block, segment of the queries that chose it) gathers those queries' rows, so no
program scans queries that did not choose its block. Segments add into fp32 buffers.

Block-major forward (small groups, where a position tile's union wastes the matrix units
and re-reads K/V): the same work items; each row's attention over one block goes, normalised,
into its own slot with its log-sum-exp (split-K, as flash-decoding does), and a second kernel
merges a row's n slots. No atomics; the slot buffer is bounded by running the positions in
chunks. Block-major dq (small groups) is the same pattern in a kernel of its own: each row's
dS K over one block into its slot (fp16 with a per-slot power-of-two scale for 16-bit inputs),
then a plain sum. Computing dS K inside the dK/dV kernel instead (fp32 atomics, or the same
slots) measured slower on the H100 and the H200 at 4 warps (docs/kernel_notes.md); the same
slots written from the dK/dV kernel at 8 warps (``DQ_SLOTS``: q and dO gathered once for both)
are the default from Dk = 160 (``sel_dq_fused_min_dk``: 32% off the backward at Dk = 192, no
gain at 128; ``sel_dq_algo="fused"`` forces them).
FORCED (``nsa.Geometry.forced_split``): the forced blocks ran in the range kernels; the
position-major kernels skip them (and start from their (o, lse)), the work list leaves them
out, and the merge takes their (o, lse) as one more slot.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .gates import gate_rows
from .headdim import rest_acc, rest_amax, rest_dot, rest_load, rest_scale, rest_store, rest_tma, rest_zeros
from .range_attn import TILE_COLS, _query_tile, dkdv_update


@triton.jit
def _sel_rows(TILES, tile, h, HQ, G: tl.constexpr, BT: tl.constexpr, BLOCK_M: tl.constexpr):
    """A query tile's rows: positions t (t1: the tile's end; ds0: its document's start), their
    rows (t - q_off) * HQ + head of q and the other per-query tensors, and q_off."""
    t0, t1, ds0, _, q_off = _query_tile(TILES, tile)
    r = tl.arange(0, BLOCK_M)
    t = t0 + r // G
    row_ok = (r < BT * G) & (t < t1)
    rq = (t - q_off) * HQ + h * G + r % G
    return t, t1, ds0, row_ok, rq, q_off


@triton.jit
def _union_range(cnt, t0, ds0, LS: tl.constexpr, BT: tl.constexpr, FORCED: tl.constexpr):
    """Which entries of a tile's block union to walk. With FORCED (the range kernels ran the
    forced blocks) and one position per tile, the union is that position's own ascending list,
    whose forced blocks are its first entry (block 0) and its last min(cb, 2) (cb - 1, cb)."""
    if FORCED and BT == 1:
        cb = (t0 - ds0) // LS
        return 1, cnt - tl.minimum(cb, 2)
    else:
        return 0, cnt


@triton.jit
def _sel_fwd(Q, K, V, O, LSE, OF, LF, TILES, IDX, UNION, UCNT, KD, VD, OC, OW, GATES, OUT, scale2, HQ, DK, DV,
             NSEL, UMAX, G: tl.constexpr, LS: tl.constexpr, BT: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, NPAD: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
             FORCED: tl.constexpr, PREC: tl.constexpr, BDK2: tl.constexpr, BDK3: tl.constexpr,
             TMA: tl.constexpr = False, GATED: tl.constexpr = False, HAS_WIN: tl.constexpr = False):
    """Position-major forward. FORCED: the forced blocks' attention (OF, base-2 log-sum-exp LF,
    from the range kernel; they may be O and LSE themselves, as a program reads its rows'
    state before it writes them) is the starting state, and those blocks are skipped.
    TMA: K and V blocks through the tensor descriptors KD / VD ([T, H * D], one block of one
    KV head a load, ``tma.kv_descriptors``); keys past the tile's end are read, then masked.
    GATED: also the layer's output OUT = the gate combination of OC, this result and OW
    (HAS_WIN) with GATES [rows, 3] (``gates.gate_rows``; ``launch.gate_fused``)."""
    tile = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    H = HQ // G
    t, t1, ds0, row_ok, rq, q_off = _sel_rows(TILES, tile, h, HQ, G, BT, BLOCK_M)
    IDX -= q_off * (H * NSEL)  # IDX has query rows: position t's is t - q_off
    tloc = t - ds0
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    jn = tl.arange(0, NPAD)
    q = tl.load(Q + rq[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk < DK)[None, :], other=0.0)
    q_r = rest_load(Q, rq, row_ok, DK, q, BDK, BDK2, BDK3)
    sel = tl.load(IDX + (t * H + h)[:, None] * NSEL + jn[None, :],
                  mask=row_ok[:, None] & (jn < NSEL)[None, :], other=-1)
    cnt = tl.load(UCNT + tile * H + h)
    jb = tl.arange(0, BLOCK_N)
    tmax = t1 - 1 - ds0
    if FORCED:
        # the state (m, l, acc) = (lse_f, 1, o_f) continues the forced blocks' softmax exactly
        lf = tl.load(LF + rq, mask=row_ok, other=float("inf"))
        seen = lf < float("inf")
        m_i = tl.where(seen, lf, -1.0e30)
        l_i = tl.where(seen, 1.0, 0.0)
        acc = tl.load(OF + rq[:, None] * DV + dv[None, :], mask=(row_ok & seen)[:, None] & (dv < DV)[None, :],
                      other=0.0).to(tl.float32)
    else:
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BDV], tl.float32)
    u0, u1 = _union_range(cnt, tl.load(TILES + tile * TILE_COLS), ds0, LS, BT, FORCED)
    for u in range(u0, u1):
        b = tl.load(UNION + (tile * H + h) * UMAX + u)
        chosen = tl.sum((sel == b).to(tl.int32), 1) > 0
        if FORCED:
            chosen = chosen & (b != 0) & (b < tloc // LS - 1)
        pos = b.to(tl.int64) * LS + jb
        key_ok = (jb < LS) & (pos <= tmax)
        kr = (ds0 + pos) * H + h
        if TMA:
            k0 = (ds0 + b * LS).to(tl.int32)
            k = tl.trans(KD.load([k0, h * DK]))
            k_r = rest_tma(KD, k0, h * DK, k, BDK, BDK2, BDK3, TRANS=True)
            v = VD.load([k0, h * DV])
        else:
            k = tl.load(K + kr[None, :] * DK + dk[:, None], mask=key_ok[None, :] & (dk < DK)[:, None], other=0.0)
            k_r = rest_load(K, kr, key_ok, DK, k, BDK, BDK2, BDK3, TRANS=True)
            v = tl.load(V + kr[:, None] * DV + dv[None, :], mask=key_ok[:, None] & (dv < DV)[None, :], other=0.0)
        s = rest_dot(tl.dot(q, k, input_precision=PREC), q_r, k_r, BDK2, BDK3, PREC) * scale2
        ok = chosen[:, None] & key_ok[None, :] & (pos[None, :] <= tloc[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    empty = l_i == 0.0
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + rq, lse, mask=row_ok)
    o = (acc / tl.where(empty, 1.0, l_i)[:, None]).to(O.dtype.element_ty)
    tl.store(O + rq[:, None] * DV + dv[None, :], o, mask=row_ok[:, None] & (dv < DV)[None, :])
    if GATED:
        gate_rows(OC, OW, GATES, OUT, rq, row_ok, dv, DV, o, HAS_WIN)


@triton.jit
def _sel_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, DQO, TILES, IDX, UNION, UCNT, KD, VD, scale2, scale, HQ, DK, DV,
                NSEL, UMAX, G: tl.constexpr, LS: tl.constexpr, BT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NPAD: tl.constexpr,
                BDK: tl.constexpr, BDV: tl.constexpr, FORCED: tl.constexpr, PREC: tl.constexpr,
                BDK2: tl.constexpr, BDK3: tl.constexpr, TMA: tl.constexpr = False):
    """Position-major dq; FORCED: the forced blocks' part came from the range dq kernel. TMA:
    K and V blocks through descriptors, as ``_sel_fwd``."""
    tile = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    H = HQ // G
    t, t1, ds0, row_ok, rq, q_off = _sel_rows(TILES, tile, h, HQ, G, BT, BLOCK_M)
    IDX -= q_off * (H * NSEL)  # IDX has query rows: position t's is t - q_off
    tloc = t - ds0
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    jn = tl.arange(0, NPAD)
    q = tl.load(Q + rq[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk < DK)[None, :], other=0.0)
    q_r = rest_load(Q, rq, row_ok, DK, q, BDK, BDK2, BDK3)
    do = tl.load(DO + rq[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv < DV)[None, :], other=0.0)
    lse = tl.load(LSE + rq, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + rq, mask=row_ok, other=0.0)
    sel = tl.load(IDX + (t * H + h)[:, None] * NSEL + jn[None, :],
                  mask=row_ok[:, None] & (jn < NSEL)[None, :], other=-1)
    cnt = tl.load(UCNT + tile * H + h)
    jb = tl.arange(0, BLOCK_N)
    tmax = t1 - 1 - ds0
    dq = tl.zeros([BLOCK_M, BDK], tl.float32)
    dq_r = rest_zeros(BLOCK_M, dq, BDK2, BDK3)
    u0, u1 = _union_range(cnt, tl.load(TILES + tile * TILE_COLS), ds0, LS, BT, FORCED)
    for u in range(u0, u1):
        b = tl.load(UNION + (tile * H + h) * UMAX + u)
        chosen = tl.sum((sel == b).to(tl.int32), 1) > 0
        if FORCED:
            chosen = chosen & (b != 0) & (b < tloc // LS - 1)
        pos = b.to(tl.int64) * LS + jb
        key_ok = (jb < LS) & (pos <= tmax)
        kr = (ds0 + pos) * H + h
        if TMA:
            k0 = (ds0 + b * LS).to(tl.int32)
            k = KD.load([k0, h * DK])
            k_r = rest_tma(KD, k0, h * DK, k, BDK, BDK2, BDK3)
            v = tl.trans(VD.load([k0, h * DV]))
        else:
            k = tl.load(K + kr[:, None] * DK + dk[None, :], mask=key_ok[:, None] & (dk < DK)[None, :], other=0.0)
            k_r = rest_load(K, kr, key_ok, DK, k, BDK, BDK2, BDK3)
            v = tl.load(V + kr[None, :] * DV + dv[:, None], mask=key_ok[None, :] & (dv < DV)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        s = rest_dot(s, q_r, k_r, BDK2, BDK3, PREC, TRANS_B=True) * scale2
        ok = chosen[:, None] & key_ok[None, :] & (pos[None, :] <= tloc[:, None])
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, v, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        dq_r = rest_acc(dq_r, ds.to(k.dtype), k_r, BDK2, BDK3, PREC)
    # the last dq term: the other branches' sum (fp32 DQ) plus this one, stored in q's dtype
    off = rq[:, None] * DK + dk[None, :]
    msk = row_ok[:, None] & (dk < DK)[None, :]
    tl.store(DQO + off, (tl.load(DQ + off, mask=msk, other=0.0) + dq * scale).to(DQO.dtype.element_ty), mask=msk)
    rest_store(DQO, rq, row_ok, DK, rest_scale(dq_r, scale, BDK2, BDK3), BDK, BDK2, BDK3, BASE=DQ)


@triton.jit
def _sel_item(ITEMS, item, H, LS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Work item ``item`` of the block-major kernels (``tiles.SelWork``): its KV head, the
    offset and length of its list of query rows, and its block's keys: positions in the
    rows' frame (position - q_off, compared with the rows for causality), validity, K-V rows."""
    h = tl.load(ITEMS + item * 6)
    k0 = tl.load(ITEMS + item * 6 + 1)
    k1 = tl.load(ITEMS + item * 6 + 2)
    off = tl.load(ITEMS + item * 6 + 3)
    n = tl.load(ITEMS + item * 6 + 4)
    q_off = tl.load(ITEMS + item * 6 + 5)
    jb = tl.arange(0, BLOCK_N)
    kpos = k0 + jb
    key_ok = (jb < LS) & (kpos < k1)
    return h, off, n, kpos - q_off, key_ok, kpos * H + h


@triton.jit
def _sel_fwd_split(Q, K, V, OP, LP, ITEMS, QLIST, SLIST, scale2, HQ, DK, DV, NSEL, row0,
                   G: tl.constexpr, LS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BDK: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr, BDK2: tl.constexpr,
                   BDK3: tl.constexpr, EVQ: tl.constexpr, EVS: tl.constexpr):
    """One program per (KV head, block, segment of choosing queries): each row's attention over
    this one block, normalised, into its slot: OP[row - row0, slot] and its log2-sum-exp2
    LP[...] (-inf where no key is visible). ``_sel_combine`` merges a row's slots.
    EVQ / EVS: L2 eviction policies of the gathered query rows / the slot stores ("": normal;
    ``LaunchConfig.sel_l2_hints``)."""
    H = HQ // G
    h, off, n, kpos, key_ok, kr = _sel_item(ITEMS, tl.program_id(0).to(tl.int64), H, LS, BLOCK_N)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    k = tl.load(K + kr[None, :] * DK + dk[:, None], mask=key_ok[None, :] & (dk < DK)[:, None], other=0.0)
    k_r = rest_load(K, kr, key_ok, DK, k, BDK, BDK2, BDK3, TRANS=True)
    v = tl.load(V + kr[:, None] * DV + dv[None, :], mask=key_ok[:, None] & (dv < DV)[None, :], other=0.0)
    for r0 in range(0, n * G, BLOCK_M):
        t = _sel_pos(QLIST, off, n, r0, G, BLOCK_M)
        row_ok, rq, q, q_r = _sel_fwd_gather(Q, t, r0, n, h, HQ, DK, dk, G, BLOCK_M, BDK, BDK2, BDK3, EVQ)
        _sel_fwd_split_step(OP, LP, row_ok, t, rq, q, q_r, SLIST, off, r0, k, k_r, v, kpos, key_ok, dv,
                            scale2, DV, NSEL, row0, G, BLOCK_M, PREC, BDK2, BDK3, EVS)


@triton.jit
def _sel_pos(QLIST, off, n, r0, G: tl.constexpr, BLOCK_M: tl.constexpr):
    """Positions of rows r0..r0+BLOCK_M-1 of a work item's n positions x G heads (0 past its end)."""
    r = r0 + tl.arange(0, BLOCK_M)
    return tl.load(QLIST + off + r // G, mask=r < n * G, other=0)


@triton.jit
def _sel_fwd_gather(Q, t, r0, n, h, HQ, DK, dk, G: tl.constexpr, BLOCK_M: tl.constexpr,
                    BDK: tl.constexpr, BDK2: tl.constexpr, BDK3: tl.constexpr, EVQ: tl.constexpr):
    """Rows r0.. of a work item at positions t (``_sel_pos``): (row_ok, query rows rq, q, q's
    later head-dim pieces), gathered."""
    r = r0 + tl.arange(0, BLOCK_M)
    row_ok = r < n * G
    rq = t * HQ + h * G + r % G
    q = tl.load(Q + rq[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk < DK)[None, :], other=0.0,
                eviction_policy=EVQ)
    q_r = rest_load(Q, rq, row_ok, DK, q, BDK, BDK2, BDK3)
    return row_ok, rq, q, q_r


@triton.jit
def _sel_slot(SLIST, off, r0, row_ok, G: tl.constexpr, BLOCK_M: tl.constexpr):
    """The slots (place in their position's list) of rows r0..r0+BLOCK_M-1 of a work item."""
    return tl.load(SLIST + off + (r0 + tl.arange(0, BLOCK_M)) // G, mask=row_ok, other=0)


@triton.jit
def _sel_fwd_split_step(OP, LP, row_ok, t, rq, q, q_r, SLIST, off, r0, k, k_r, v, kpos, key_ok, dv, scale2, DV,
                        NSEL, row0, G: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr, BDK2: tl.constexpr,
                        BDK3: tl.constexpr, EVS: tl.constexpr):
    """One step of ``_sel_fwd_split``: these rows' attention over the block into their slots,
    read after the products from SLIST at the item's offset off and step r0."""
    s = rest_dot(tl.dot(q, k, input_precision=PREC), q_r, k_r, BDK2, BDK3, PREC) * scale2
    s = tl.where(row_ok[:, None] & key_ok[None, :] & (kpos[None, :] <= t[:, None]), s, float("-inf"))
    m = tl.max(s, 1)
    ms = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp2(s - ms[:, None])
    l = tl.sum(p, 1)  # >= 1 where any key is visible
    acc = tl.dot(p.to(v.dtype), v, input_precision=PREC) / tl.maximum(l, 1.0)[:, None]
    slot = _sel_slot(SLIST, off, r0, row_ok, G, BLOCK_M)
    ps = (rq - row0) * NSEL + slot  # row0 = first position of the chunk x HQ (host int: 64-bit when large)
    tl.store(LP + ps, tl.where(l > 0, ms + tl.log2(tl.maximum(l, 1.0)), float("-inf")), mask=row_ok,
             eviction_policy=EVS)
    tl.store(OP + ps[:, None] * DV + dv[None, :], acc.to(OP.dtype.element_ty),
             mask=row_ok[:, None] & (dv < DV)[None, :], eviction_policy=EVS)


@triton.jit
def _sel_combine(OP, LP, VALID, OF, LF, O, LSE, OC, OW, GATES, OUT, rows, HQ, NSEL, DV, G: tl.constexpr,
                 BLOCK_R: tl.constexpr, NPAD: tl.constexpr, BDV: tl.constexpr, FORCED: tl.constexpr,
                 EVS: tl.constexpr, GATED: tl.constexpr = False, HAS_WIN: tl.constexpr = False):
    """Merge each row's per-slot results: lse = log2-sum-exp2 of LP, o = sum_j 2^(LP_j - lse) OP_j,
    with FORCED one more term, the forced blocks' (OF, LF: +inf where nothing was visible).
    VALID [positions, H, NSEL] marks the slots the split kernel wrote (the others hold garbage
    and count as empty). Rows that saw nothing get lse = +inf and o = 0. GATED: also the
    layer's output OUT, as ``_sel_fwd``'s."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < rows
    jn = tl.arange(0, NPAD)
    dv = tl.arange(0, BDV)
    H = HQ // G
    vrow = ((r // HQ) * H + (r % HQ) // G) * NSEL
    ok = row_ok[:, None] & (jn < NSEL)[None, :]
    ok &= tl.load(VALID + vrow[:, None] + jn[None, :], mask=ok, other=0) != 0
    lp = tl.load(LP + r[:, None] * NSEL + jn[None, :], mask=ok, other=float("-inf"), eviction_policy=EVS)
    m = tl.max(lp, 1)
    if FORCED:
        lf = tl.load(LF + r, mask=row_ok, other=float("inf"))
        lf = tl.where(lf < float("inf"), lf, float("-inf"))  # as a slot: -inf is empty
        m = tl.maximum(m, lf)
    seen = m > float("-inf")
    ms = tl.where(seen, m, 0.0)
    w = tl.exp2(lp - ms[:, None])
    l = tl.sum(w, 1)
    if FORCED:
        wf = tl.exp2(lf - ms)
        l += wf
    lse = tl.where(seen, ms + tl.log2(tl.maximum(l, 1.0)), float("inf"))
    w = w / tl.maximum(l, 1.0)[:, None]
    acc = tl.zeros([BLOCK_R, BDV], tl.float32)
    if FORCED:
        wf = wf / tl.maximum(l, 1.0)
        acc += wf[:, None] * tl.load(OF + r[:, None] * DV + dv[None, :],
                                     mask=(row_ok & (wf > 0))[:, None] & (dv < DV)[None, :], other=0.0).to(tl.float32)
    for j in range(NSEL):
        wj = tl.sum(tl.where(jn[None, :] == j, w, 0.0), 1)
        okj = row_ok & (wj > 0)  # unwritten slots hold garbage: never read them
        oj = tl.load(OP + (r * NSEL + j)[:, None] * DV + dv[None, :], mask=okj[:, None] & (dv < DV)[None, :],
                     other=0.0, eviction_policy=EVS)
        acc += wj[:, None] * oj.to(tl.float32)
    tl.store(LSE + r, lse, mask=row_ok)
    o = acc.to(O.dtype.element_ty)
    tl.store(O + r[:, None] * DV + dv[None, :], o, mask=row_ok[:, None] & (dv < DV)[None, :])
    if GATED:
        gate_rows(OC, OW, GATES, OUT, r, row_ok, dv, DV, o, HAS_WIN)


@triton.jit
def _sel_bwd_gather(Q, DO, LSE, DELTA, t, r0, n, h, HQ, DK, DV, dk, dv, G: tl.constexpr,
                    BLOCK_M: tl.constexpr, BDK: tl.constexpr, BDK2: tl.constexpr, BDK3: tl.constexpr,
                    EVQ: tl.constexpr):
    """Rows r0..r0+BLOCK_M-1 of a work item's n positions x G heads at positions t
    (``_sel_pos``; block-major backward): (row_ok, query rows rq, q, q's later head-dim
    pieces, dO, lse, delta), gathered."""
    row_ok, rq, q, q_r = _sel_fwd_gather(Q, t, r0, n, h, HQ, DK, dk, G, BLOCK_M, BDK, BDK2, BDK3, EVQ)
    do = tl.load(DO + rq[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv < DV)[None, :], other=0.0,
                 eviction_policy=EVQ)
    lse = tl.load(LSE + rq, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + rq, mask=row_ok, other=0.0)
    return row_ok, rq, q, q_r, do, lse, delta


@triton.jit
def _sel_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK32, DV32, ITEMS, QLIST, DQP, DQS, SLIST, scale2, scale, HQ, DK, DV,
                  NSEL, row0, G: tl.constexpr, LS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BDK: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr, BDK2: tl.constexpr,
                  BDK3: tl.constexpr, DQ_SLOTS: tl.constexpr, SCALED: tl.constexpr, EVQ: tl.constexpr,
                  EVS: tl.constexpr):
    """One program per (KV head, block, segment of choosing queries); adds into fp32 dK/dV.
    DQ_SLOTS (``sel_dq_algo="fused"``): each step also writes its rows' dq over this block,
    dS K, into their slots as ``_sel_bwd_dq_split`` does (same arguments DQP, DQS, SLIST, NSEL,
    row0, SCALED): one pass over the gathered q / dO rows instead of two, one more product
    (a [rows, Dk] temporary, not an accumulator)."""
    H = HQ // G
    h, off, n, kpos, key_ok, kr = _sel_item(ITEMS, tl.program_id(0).to(tl.int64), H, LS, BLOCK_N)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    k = tl.load(K + kr[:, None] * DK + dk[None, :], mask=key_ok[:, None] & (dk < DK)[None, :], other=0.0)
    k_r = rest_load(K, kr, key_ok, DK, k, BDK, BDK2, BDK3)
    v = tl.load(V + kr[:, None] * DV + dv[None, :], mask=key_ok[:, None] & (dv < DV)[None, :], other=0.0)
    acc_k = tl.zeros([BLOCK_N, BDK], tl.float32)
    acc_k_r = rest_zeros(BLOCK_N, acc_k, BDK2, BDK3)
    acc_v = tl.zeros([BLOCK_N, BDV], tl.float32)
    for r0 in range(0, n * G, BLOCK_M):
        t = _sel_pos(QLIST, off, n, r0, G, BLOCK_M)
        row_ok, rq, q, q_r, do, lse, delta = _sel_bwd_gather(Q, DO, LSE, DELTA, t, r0, n, h, HQ, DK, DV, dk, dv, G,
                                                             BLOCK_M, BDK, BDK2, BDK3, EVQ)
        acc_k, acc_k_r, acc_v = _sel_dkdv_step(acc_k, acc_k_r, acc_v, row_ok, t, rq, q, q_r, SLIST, off, r0, do, lse,
                                               delta, k, k_r, v, kpos, key_ok, DQP, DQS, row0, NSEL, DK, scale2, scale,
                                               G, BLOCK_M, BDK, PREC, BDK2, BDK3, DQ_SLOTS, SCALED, EVS)
    tl.atomic_add(DK32 + kr[:, None] * DK + dk[None, :], acc_k * scale,
                  mask=key_ok[:, None] & (dk < DK)[None, :])
    rest_store(DK32, kr, key_ok, DK, rest_scale(acc_k_r, scale, BDK2, BDK3), BDK, BDK2, BDK3, ATOMIC=True)
    tl.atomic_add(DV32 + kr[:, None] * DV + dv[None, :], acc_v,
                  mask=key_ok[:, None] & (dv < DV)[None, :])


@triton.jit
def _sel_dkdv_step(acc_k, acc_k_r, acc_v, row_ok, t, rq, q, q_r, SLIST, off, r0, do, lse, delta, k, k_r, v,
                   kpos, key_ok, DQP, DQS, row0, NSEL, DK, scale2, scale, G: tl.constexpr, BLOCK_M: tl.constexpr,
                   BDK: tl.constexpr,
                   PREC: tl.constexpr, BDK2: tl.constexpr, BDK3: tl.constexpr, DQ_SLOTS: tl.constexpr,
                   SCALED: tl.constexpr, EVS: tl.constexpr):
    """One step of ``_sel_bwd_dkdv``: these rows' part of dK (unscaled) and dV, and with DQ_SLOTS
    their dq over the block into their slots (read from SLIST as ``_sel_fwd_split_step`` does)."""
    st = tl.dot(k, tl.trans(q), input_precision=PREC)
    st = rest_dot(st, k_r, q_r, BDK2, BDK3, PREC, TRANS_B=True) * scale2
    ok = key_ok[:, None] & row_ok[None, :] & (kpos[:, None] <= t[None, :])
    pt = tl.where(ok, tl.exp2(st - lse[None, :]), 0.0)
    acc_k, acc_k_r, acc_v, dst = dkdv_update(acc_k, acc_k_r, acc_v, pt, q, q_r, do, v, delta, BDK2, BDK3, PREC)
    if DQ_SLOTS:
        ds = tl.trans(dst.to(k.dtype))
        dq = tl.dot(ds, k, input_precision=PREC) * scale
        dq_r = rest_scale(rest_acc(rest_zeros(BLOCK_M, dq, BDK2, BDK3), ds, k_r, BDK2, BDK3, PREC), scale,
                          BDK2, BDK3)
        slot = _sel_slot(SLIST, off, r0, row_ok, G, BLOCK_M)
        _store_dq_slot(DQP, DQS, slot, row_ok, rq, row0, NSEL, DK, dq, dq_r, SCALED, BDK, BDK2, BDK3, EVS)
    return acc_k, acc_k_r, acc_v


@triton.jit
def _store_dq_slot(DQP, DQS, slot, row_ok, rq, row0, NSEL, DK, dq, dq_r, SCALED: tl.constexpr,
                   BDK: tl.constexpr, BDK2: tl.constexpr, BDK3: tl.constexpr, EVS: tl.constexpr):
    """Query rows rq's dq over one block (dq [rows, BDK] fp32 and its later Dk pieces dq_r) into
    their slots DQP[row - row0, slot] (``_sel_slot``); SCALED: fp16 holding dq / DQS[slot], DQS a per-(row, slot)
    power of two that puts the row's largest |dq| near 2^14 (``_sel_bwd_dq_split``)."""
    dk = tl.arange(0, BDK)
    ps = (rq - row0) * NSEL + slot  # row0 = first position of the chunk x HQ (host int: 64-bit when large)
    if SCALED:
        amax = rest_amax(tl.max(tl.abs(dq), 1), dq_r, BDK2, BDK3)
        # scale 1 where the row is all zero or not finite (inf / nan then reach dq as they are)
        fin = (amax > 0) & (amax < float("inf"))
        sc = tl.where(fin, tl.exp2(tl.ceil(tl.log2(tl.where(fin, amax, 1.0))) - 14.0), 1.0)
        tl.store(DQS + ps, sc, mask=row_ok, eviction_policy=EVS)
        dq = dq / sc[:, None]
        dq_r = rest_scale(dq_r, 1.0 / sc[:, None], BDK2, BDK3)
    tl.store(DQP + ps[:, None] * DK + dk[None, :], dq.to(DQP.dtype.element_ty),
             mask=row_ok[:, None] & (dk < DK)[None, :], eviction_policy=EVS)
    rest_store(DQP, ps, row_ok, DK, dq_r, BDK, BDK2, BDK3)


@triton.jit
def _sel_bwd_dq_split(Q, K, V, DO, LSE, DELTA, DQP, DQS, ITEMS, QLIST, SLIST, scale2, scale, HQ, DK, DV,
                      NSEL, row0, G: tl.constexpr, LS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, SCALED: tl.constexpr,
                      PREC: tl.constexpr, BDK2: tl.constexpr, BDK3: tl.constexpr, EVQ: tl.constexpr,
                      EVS: tl.constexpr):
    """Block-major dq: one program per (KV head, block, segment of choosing queries) writes each
    row's dq over this one block, scale * dS K, into its slot DQP[row - row0, slot].
    dS uses the branch's final lse and delta, so a row's dq is the plain sum of its slots
    (``_sel_dq_combine``). K/V are read once per segment, not once per position.
    SCALED: DQP is fp16 holding dq / DQS[slot], DQS a per-(row, slot) power of two that puts
    the row's largest |dq| near 2^14: half the bytes of fp32 with fp16's 11-bit precision
    (bf16's 8 bits cost a visible part of the dq error budget)."""
    H = HQ // G
    h, off, n, kpos, key_ok, kr = _sel_item(ITEMS, tl.program_id(0).to(tl.int64), H, LS, BLOCK_N)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    k = tl.load(K + kr[:, None] * DK + dk[None, :], mask=key_ok[:, None] & (dk < DK)[None, :], other=0.0)
    k_r = rest_load(K, kr, key_ok, DK, k, BDK, BDK2, BDK3)
    vt = tl.load(V + kr[None, :] * DV + dv[:, None], mask=key_ok[None, :] & (dv < DV)[:, None], other=0.0)
    for r0 in range(0, n * G, BLOCK_M):
        t = _sel_pos(QLIST, off, n, r0, G, BLOCK_M)
        row_ok, rq, q, q_r, do, lse, delta = _sel_bwd_gather(Q, DO, LSE, DELTA, t, r0, n, h, HQ, DK, DV, dk, dv, G,
                                                             BLOCK_M, BDK, BDK2, BDK3, EVQ)
        _sel_dq_split_step(DQP, DQS, row_ok, t, rq, q, q_r, SLIST, off, r0, do, lse, delta, k, k_r, vt, kpos, key_ok,
                           row0, NSEL, DK, scale2, scale, G, BLOCK_M, BDK, PREC, BDK2, BDK3, SCALED, EVS)


@triton.jit
def _sel_dq_split_step(DQP, DQS, row_ok, t, rq, q, q_r, SLIST, off, r0, do, lse, delta, k, k_r, vt, kpos,
                       key_ok, row0, NSEL, DK, scale2, scale, G: tl.constexpr, BLOCK_M: tl.constexpr,
                       BDK: tl.constexpr, PREC: tl.constexpr, BDK2: tl.constexpr, BDK3: tl.constexpr,
                       SCALED: tl.constexpr, EVS: tl.constexpr):
    """One step of ``_sel_bwd_dq_split``: these rows' dq over the block into their slots (read
    from SLIST as ``_sel_fwd_split_step`` does)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    s = rest_dot(s, q_r, k_r, BDK2, BDK3, PREC, TRANS_B=True) * scale2
    ok = row_ok[:, None] & key_ok[None, :] & (kpos[None, :] <= t[:, None])
    p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
    ds = p * (tl.dot(do, vt, input_precision=PREC) - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC) * scale
    dq_r = rest_acc(rest_zeros(BLOCK_M, dq, BDK2, BDK3), ds.to(k.dtype), k_r, BDK2, BDK3, PREC)
    dq_r = rest_scale(dq_r, scale, BDK2, BDK3)
    slot = _sel_slot(SLIST, off, r0, row_ok, G, BLOCK_M)
    _store_dq_slot(DQP, DQS, slot, row_ok, rq, row0, NSEL, DK, dq, dq_r, SCALED, BDK, BDK2, BDK3, EVS)


@triton.jit
def _sel_dq_combine(DQP, DQS, VALID, DQ, DQO, rows, HQ, NSEL, DK, G: tl.constexpr, BLOCK_R: tl.constexpr,
                    BDK: tl.constexpr, SCALED: tl.constexpr, EVS: tl.constexpr):
    """DQO[r] = DQ[r] (fp32, the other branches) + the sum of row r's written dq slots, in DQO's
    dtype (VALID [positions, H, NSEL] marks the slots; the others hold garbage and are never
    read), times their DQS scales when SCALED. r counts rows (position x query head) of a chunk."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < rows
    H = HQ // G
    vrow = ((r // HQ) * H + (r % HQ) // G) * NSEL
    dk = tl.arange(0, BDK)
    msk = row_ok[:, None] & (dk < DK)[None, :]
    acc = tl.zeros([BLOCK_R, BDK], tl.float32)
    for j in range(NSEL):
        ok = tl.load(VALID + vrow + j, mask=row_ok, other=0) != 0
        part = tl.load(DQP + (r * NSEL + j)[:, None] * DK + dk[None, :], mask=ok[:, None] & (dk < DK)[None, :],
                       other=0.0, eviction_policy=EVS).to(tl.float32)
        if SCALED:
            part = part * tl.load(DQS + r * NSEL + j, mask=ok, other=0.0, eviction_policy=EVS)[:, None]
        acc += part
    off = r[:, None] * DK + dk[None, :]
    tl.store(DQO + off, (tl.load(DQ + off, mask=msk, other=0.0) + acc).to(DQO.dtype.element_ty), mask=msk)

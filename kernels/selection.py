"""Block importance and top-n selection on the GPU (SPEC: selection branch).

The importance of block j for position t and KV head h is
``sum_g sum_i W[i, j] * p_cmp(t, g)[i]`` (Eq. 9 overlap weights, Eq. 10 group sum). A
program's rows are (position, query head) pairs of one KV head, BT positions x GP head
slots (GP = G rounded up to a power of two; the extra slots are masked), as in the range
kernels: the queries are loaded once, every compressed-key tile feeds one BT*GP-row matrix
product whatever the group size, and the group sum is a reduction over the head slots. p_cmp
is recomputed from the compressed log-sum-exp for just the compressed tokens of the current
chunk of blocks, so no [S, Nc] probability matrix exists anywhere. Where l'/d is small
(<= 4 at n <= 16) and G <= 16 a chunk is the tokens starting in whole blocks and the
weights follow from each token's offset (``_importance_aligned``); otherwise it is the
tokens overlapping its blocks, weighted by an overlap matrix built in registers
(``_importance``). Each (t, h, j) gets one int64 key: the float's bits above,
``2**31 - 1 - j`` below, forced blocks as +inf and non-candidates as -1. Keys are
distinct, so a running top-n over the chunks picks exactly what a stable sort would:
equal importance goes to the lower block index.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tma
from .headdim import rest_dot, rest_load, rest_tma
from .range_attn import _nvis, _query_tile

# tl.topk / tl.bitonic_merge (newer Triton): the top-n merge in log2(NP) stages
HAS_BITONIC_MERGE = hasattr(tl, "bitonic_merge") and hasattr(tl, "topk")


@triton.jit
def _first_part(x, PARTS: tl.constexpr):
    """x [R, PARTS, C] -> x[:, 0, :]: the first C of each row of a sorted [R, PARTS * C]
    (Triton has no slicing: a masked sum over one entry)."""
    part = tl.arange(0, PARTS)[None, :, None]
    return tl.sum(tl.where(part == 0, x, 0), 1)


@triton.jit
def _key_tile(KC, KCD, cs0, i0, i, n_ok, h, H, DK, dk, BDK: tl.constexpr, BDK2: tl.constexpr,
              BDK3: tl.constexpr, TMA: tl.constexpr):
    """Compressed keys i = i0 + arange (the first n_ok of them real) of KV head h, transposed
    [BDK, BLOCK_N], and their later head-dim pieces; TMA: one box of the descriptor KCD
    (``tma.kv_descriptors``), the keys past n_ok read and masked by the caller."""
    if TMA:
        kc = tl.trans(KCD.load([(cs0 + i0).to(tl.int32), h * DK]))
        kc_r = rest_tma(KCD, (cs0 + i0).to(tl.int32), h * DK, kc, BDK, BDK2, BDK3, TRANS=True)
    else:
        kc = tl.load(KC + ((cs0 + i) * H + h)[None, :] * DK + dk[:, None],
                     mask=(i < n_ok)[None, :] & (dk < DK)[:, None], other=0.0)
        kc_r = rest_load(KC, (cs0 + i) * H + h, i < n_ok, DK, kc, BDK, BDK2, BDK3, TRANS=True)
    return kc, kc_r


@triton.jit
def _importance(q, q_r, KC, KCD, lse, nv_r, i0, i_hi, j, cs0, h, H, DK, dk, scale2, BT: tl.constexpr,
                GP: tl.constexpr, L: tl.constexpr, DS: tl.constexpr, LS: tl.constexpr, BLOCK_N: tl.constexpr,
                PREC: tl.constexpr, BDK: tl.constexpr, BDK2: tl.constexpr, BDK3: tl.constexpr, TMA: tl.constexpr):
    """Importance [BT, len(j)] of blocks j from compressed tokens i0..min(i0+BLOCK_N, i_hi)-1."""
    i = i0 + tl.arange(0, BLOCK_N)
    kc, kc_r = _key_tile(KC, KCD, cs0, i0, i, i_hi, h, H, DK, dk, BDK, BDK2, BDK3, TMA)
    lo = tl.maximum(i[:, None] * DS, j[None, :] * LS)
    hi = tl.minimum(i[:, None] * DS + L, j[None, :] * LS + LS)
    w = (tl.maximum(hi - lo, 0) // DS).to(tl.float32)  # Eq. 9 weights [BLOCK_N, len(j)]
    s = rest_dot(tl.dot(q, kc, input_precision=PREC), q_r, kc_r, BDK2, BDK3, PREC) * scale2
    vis = (i[None, :] < nv_r[:, None]) & (i < i_hi)[None, :]
    p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
    psum = tl.sum(tl.reshape(p, [BT, GP, BLOCK_N]), 1)  # Eq. 10: the group sum
    if BT >= 16:
        imp = tl.dot(psum, w, input_precision="ieee")
    else:  # too few positions for a matrix product
        imp = tl.sum(psum[:, :, None] * w[None, :, :], 1)
    return imp


@triton.jit
def _importance_aligned(q, q_r, KC, KCD, lse, nv_r, nv_max, j0, carry, cs0, h, H, DK, dk, scale2,
                        BT: tl.constexpr, GP: tl.constexpr, R: tl.constexpr, E: tl.constexpr, BJP: tl.constexpr,
                        PREC: tl.constexpr, BDK: tl.constexpr, BDK2: tl.constexpr, BDK3: tl.constexpr,
                        TMA: tl.constexpr):
    """Importance [BT, BJP] of blocks j0..j0+BJP-1 from the R*BJP compressed tokens starting in
    them, where R = l'/d tokens start in each block and a token spans E = l/d <= R strides;
    BT >= 16 positions (the 0/1 products are matrix products).

    No weight matrix: a token starting m strides into block j weighs min(E, R - m) there and
    max(0, m + E - R) in block j + 1 (Eq. 9), so each block's share is a reshape-sum, and the
    spill moves one block right by an exact 0/1 product. ``carry`` [BT] is the previous
    chunk's spill into block j0; returns (importance, this chunk's spill past its end)."""
    BLOCK_N: tl.constexpr = BJP * R
    i = j0 * R + tl.arange(0, BLOCK_N)
    kc, kc_r = _key_tile(KC, KCD, cs0, j0 * R, i, nv_max, h, H, DK, dk, BDK, BDK2, BDK3, TMA)
    s = rest_dot(tl.dot(q, kc, input_precision=PREC), q_r, kc_r, BDK2, BDK3, PREC) * scale2
    p = tl.where(i[None, :] < nv_r[:, None], tl.exp2(s - lse[:, None]), 0.0)
    psum = tl.sum(tl.reshape(p, [BT, GP, BLOCK_N]), 1)  # Eq. 10: the group sum
    jj = tl.arange(0, BJP)
    if R == 1:  # l = l' = d: one token a block, weight 1. An exact product by the identity
        # still pays: the merge ran slower on the reduction's layout (docs/kernel_notes.md)
        return tl.dot(psum, (jj[:, None] == jj[None, :]).to(tl.float32), input_precision="ieee"), carry
    m = tl.arange(0, BLOCK_N) % R
    imp = tl.sum(tl.reshape(psum * tl.minimum(E, R - m).to(tl.float32)[None, :], [BT, BJP, R]), 2)
    if E > 1:
        spill = tl.sum(tl.reshape(psum * tl.maximum(m + E - R, 0).to(tl.float32)[None, :], [BT, BJP, R]), 2)
        shift = (jj[:, None] + 1 == jj[None, :]).to(tl.float32)  # block b's spill -> block b + 1
        imp += tl.dot(spill, shift, input_precision="ieee")
        imp += tl.where(jj[None, :] == 0, carry[:, None], 0.0)
        carry = tl.sum(tl.where(jj[None, :] == BJP - 1, spill, 0.0), 1)
    return imp, carry


@triton.jit
def _query_rows(Q, LSE, t0, t1, ds0, h, HQ, DK, G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr,
                L: tl.constexpr, DS: tl.constexpr, BDK: tl.constexpr, BDK2: tl.constexpr, BDK3: tl.constexpr):
    """A program's rows (position, head slot) of positions t0..t1-1 (document from ds0), KV head
    h: queries [BT*GP, BDK] and their later head-dim pieces (``headdim.rest_load``), base-2 log-sum-exps
    and visible compressed tokens [BT*GP], and the head-dim range; masked rows get no tokens."""
    r = tl.arange(0, BT * GP)
    tr = t0 + r // GP
    g = r % GP
    rok = (g < G) & (tr < t1)
    rq = tr * HQ + h * G + g
    dk = tl.arange(0, BDK)
    q = tl.load(Q + rq[:, None] * DK + dk[None, :], mask=rok[:, None] & (dk < DK)[None, :], other=0.0)
    q_r = rest_load(Q, rq, rok, DK, q, BDK, BDK2, BDK3)
    lse = tl.load(LSE + rq, mask=rok, other=float("inf"))
    return q, q_r, lse, tl.where(rok, _nvis(tr - ds0, L, DS), 0), dk


@triton.jit
def _select_topn(Q, KC, LSE, TILES, OUT, KCD, scale2, HQ, DK,
                 G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, L: tl.constexpr,
                 DS: tl.constexpr, LS: tl.constexpr, NSEL: tl.constexpr, NP: tl.constexpr,
                 BJ: tl.constexpr, BJP: tl.constexpr, BLOCK_N: tl.constexpr, BDK: tl.constexpr,
                 MERGE: tl.constexpr, SPAN: tl.constexpr, FITS: tl.constexpr,
                 ALIGNED: tl.constexpr, R: tl.constexpr, E: tl.constexpr, PREC: tl.constexpr, BDK2: tl.constexpr,
                 BDK3: tl.constexpr, TMA: tl.constexpr = False):
    """BT positions x one KV head: stream the blocks in chunks of BJ, keep a running top-n.
    TMA: the compressed key tiles through the descriptor KCD."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    H = HQ // G
    t0, t1, ds0, cs0, q_off = _query_tile(TILES, tile)  # position t is query row t - q_off
    Q -= q_off * (HQ * DK)
    LSE -= q_off * HQ
    OUT -= q_off * (H * NSEL)
    q, q_r, lse, nv_r, dk = _query_rows(Q, LSE, t0, t1, ds0, h, HQ, DK, G, GP, BT, L, DS, BDK, BDK2, BDK3)
    # positions
    t = t0 + tl.arange(0, BT)
    row_ok = t < t1
    cur = (t - ds0) // LS
    jj = tl.arange(0, BJP)
    col = tl.arange(0, NP)
    top = tl.full([BT, NP], -1, tl.int64)  # ascending
    nv_max = _nvis(t1 - 1 - ds0, L, DS)
    carry = tl.zeros([BT], tl.float32)  # aligned chunks: the spill into the next chunk's first block
    for j0 in range(0, (t1 - 1 - ds0) // LS + 1, BJ):
        j = j0 + jj
        # compressed tokens overlapping blocks j0..j0+BJ-1: i*DS + L > j0*LS and i*DS < (j0+BJ)*LS
        num = j0 * LS - L
        i_lo = tl.where(num >= 0, num // DS + 1, 0)
        i_hi = tl.minimum(nv_max, ((j0 + BJ) * LS - 1) // DS + 1)
        imp = tl.zeros([BT, BJP], tl.float32)
        if ALIGNED:
            imp, carry = _importance_aligned(q, q_r, KC, KCD, lse, nv_r, nv_max, j0, carry, cs0, h, H, DK, dk,
                                             scale2, BT, GP, R, E, BJP, PREC, BDK, BDK2, BDK3, TMA)
        elif FITS:  # SPAN tiles cover the chunk: no inner loop, so the pipeliner overlaps the
            # next chunk's key loads with this chunk's work (an inner loop of one trip does not)
            for sp in tl.static_range(SPAN):
                imp += _importance(q, q_r, KC, KCD, lse, nv_r, i_lo + sp * BLOCK_N, i_hi, j, cs0, h, H, DK, dk,
                                   scale2, BT, GP, L, DS, LS, BLOCK_N, PREC, BDK, BDK2, BDK3, TMA)
        else:  # one block overlaps more compressed tokens than SPAN tiles hold
            for i0 in range(i_lo, i_hi, BLOCK_N):
                imp += _importance(q, q_r, KC, KCD, lse, nv_r, i0, i_hi, j, cs0, h, H, DK, dk, scale2,
                                   BT, GP, L, DS, LS, BLOCK_N, PREC, BDK, BDK2, BDK3, TMA)
        forced = (j[None, :] == 0) | (j[None, :] == cur[:, None]) | (j[None, :] == cur[:, None] - 1)
        cand = (j[None, :] <= cur[:, None]) & (jj < BJ)[None, :]
        bits = imp.to(tl.int32, bitcast=True).to(tl.int64)
        bits = tl.where(forced, 0x7F800000, bits)
        key = tl.where(cand, bits * 4294967296 + (2147483647 - j[None, :]), -1)
        # merge: the chunk's NP largest, descending, against the running top, ascending; the
        # element-wise max of the two holds the NP largest of both as a bitonic sequence (a
        # half-cleaner), which a bitonic merge sorts. Valid keys are distinct, so this is
        # exactly a stable sort's choice. BJP >= NP.
        if MERGE:  # tl.topk / tl.bitonic_merge (newer Triton): log2(NP) stages for the merge
            top = tl.bitonic_merge(tl.maximum(top, tl.topk(key, NP, dim=1)), dim=1)
        else:
            key = tl.sort(key, dim=1, descending=True)
            if BJP > NP:
                key = _first_part(tl.reshape(key, [BT, BJP // NP, NP]), BJP // NP)
            top = tl.sort(tl.maximum(top, key), dim=1)
    # the n largest keys (the last n of top), as SPEC orders them: blocks ascending, -1 last
    keep = (top >= 0) & (col >= NP - NSEL)[None, :]
    blk = tl.where(keep, 2147483647 - (top & 0xFFFFFFFF), 2147483647).to(tl.int32)
    blk = tl.sort(blk, dim=1)
    out = tl.where(blk == 2147483647, -1, blk).to(tl.int64)
    tl.store(OUT + (t * H + h)[:, None] * NSEL + col[None, :], out,
             mask=row_ok[:, None] & (col < NSEL)[None, :])


def block_chunk(l: int, d: int, ls: int, tokens: int) -> int:
    """Blocks per top-n merge such that the compressed tokens overlapping them fit ``tokens``
    (one block when even one needs more: ``chunk_fits`` is then False)."""
    return max(1, ((tokens - l // d + 1) * d) // ls)


def chunk_fits(l: int, d: int, ls: int, tokens: int) -> bool:
    """Do the compressed tokens overlapping ``block_chunk`` blocks always fit ``tokens``?"""
    return ((tokens - l // d + 1) * d) // ls >= 1


def aligned_chunks(l: int, d: int, ls: int, tokens: int, span: int, np_: int, gp: int) -> bool:
    """Can the selection take chunks of whole blocks (``_importance_aligned``)? d divides l
    and l', l <= l' (a token reaches at most the next block; the config's rules), a tile of
    ``tokens`` holds the tokens starting in whole blocks, at least ``np_`` of them (the
    merge's width; with 64 keys and n <= 16 that is l'/d <= 4), one tile a merge, and at most
    16 head slots, so that a program has >= 16 positions. G > 16 keeps the general chunks: at
    l = l' = 2d Triton 3.6 failed to compile the whole-block path with fewer positions."""
    if ls % d or l % d or l > ls or span != 1 or gp > 16:
        return False
    r = ls // d
    return tokens % r == 0 and tokens // r >= np_


def select_from_lse(q, k_cmp, lse, geo, cfg, scale2: float) -> torch.Tensor:
    """Top-n blocks from the compressed log-sum-exp (base 2, [T, HQ]).

    q: [T, HQ, Dk] packed; k_cmp: [Nc_total, H, Dk]; geo: the call's ``nsa.Geometry`` (query
    tiles, its ``launch.select_*`` settings). Returns LongTensor [T, H, n], ascending, -1 padded.
    """
    T, HQ, DK = q.shape
    H = k_cmp.shape[1]
    l, d, ls, n = cfg.cmp_block, cfg.cmp_stride, cfg.sel_block, cfg.num_selected
    out = torch.empty((T, H, n), dtype=torch.long, device=q.device)
    if T == 0:
        return out
    G = HQ // H
    GP = triton.next_power_of_2(G)
    launch = geo.launch
    BLOCK_N = max(16, launch.select_keys)
    span = launch.select_span
    NP = max(16, triton.next_power_of_2(n))
    aligned = launch.select_aligned and aligned_chunks(l, d, ls, BLOCK_N, span, NP, GP)
    rows = launch.select_rows_aligned if aligned else launch.select_rows
    # >= 16 positions a program, so that the weight product is a matrix product, unless the
    # group alone fills the rows (G > 16: then the group sum is a broadcast)
    BT = max(rows // GP, 16 if GP <= 16 else 1)
    BDK, BDK2, BDK3 = geo.dk_split()
    BJ, BJP = _chunk_blocks(aligned, l, d, ls, BLOCK_N, span, NP)
    # default: 8 warps when a merge's chunk is wider than the top-n; 3 stages with chunks of
    # whole blocks below G = 16 (docs/kernel_notes.md, "Launch configuration")
    warps, stages = launch.select or (8 if BJP > NP else 4, 3 if aligned and GP < 16 else 2)
    # the queries and key tiles within shared memory (fp32, large Dk): fewer stages or positions;
    # below 16 positions the general chunks (their weight product is then a broadcast)
    rows_fit, _, stages = launch.fit("select", BT * GP, BLOCK_N, geo.bdk(), 0, q.element_size(), stages,
                                     rows_min=max(16, GP), fixed="keys")
    if rows_fit < BT * GP:
        BT = rows_fit // GP
        if aligned and BT < 16:
            aligned = False
            BJ, BJP = _chunk_blocks(aligned, l, d, ls, BLOCK_N, span, NP)
    tiles = geo.qtiles(BT)
    merge = HAS_BITONIC_MERGE if launch.select_merge is None else launch.select_merge
    kcd = tma.kv_descriptors(k_cmp, None, geo, BLOCK_N)[0] if launch.select_tma else None
    _select_topn[(tiles.shape[0], H)](q, k_cmp, lse, tiles, out, kcd, scale2, HQ, DK, G=G, GP=GP, BT=BT, L=l,
                                      DS=d, LS=ls, NSEL=n, NP=NP, BJ=BJ, BJP=BJP, BLOCK_N=BLOCK_N,
                                      BDK=BDK, BDK2=BDK2, BDK3=BDK3, MERGE=merge, SPAN=span,
                                      FITS=chunk_fits(l, d, ls, BLOCK_N * span), ALIGNED=aligned,
                                      R=ls // d if aligned else 1, E=l // d if aligned else 1, PREC=geo.prec,
                                      TMA=kcd is not None, num_warps=warps, num_stages=stages)
    return out


def _chunk_blocks(aligned: bool, l: int, d: int, ls: int, tokens: int, span: int, np_: int) -> tuple[int, int]:
    """(blocks per top-n merge, that rounded up to a power of two >= the merge width)."""
    if aligned:  # chunks of whole blocks: the tokens starting in them
        bj = tokens // (ls // d)
        return bj, bj
    bj = block_chunk(l, d, ls, tokens * span)
    return bj, max(np_, triton.next_power_of_2(bj))

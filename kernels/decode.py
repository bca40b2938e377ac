"""Decode kernels: one new query per sequence over the per-branch caches (SPEC.md).

The caches are ``nsa_dist.inference.LayerCache``'s: k_sel/v_sel [B, C, H, D] (every
position), k_win/v_win [B, w, H, D] (ring, slot pos % w), k_raw/v_raw [B, l, H, D] (ring of
raw compression keys), k_cmp/v_cmp [B, Ncap, H, D] (emitted compressed tokens), lengths [B]
(tokens cached per sequence; sequence b's new query sits at t = lengths[b] - 1 once
appended). Every program works on one sequence and one KV head with the G query heads of
the group as the rows of its matrix products (padded to 16 rows), so a K/V tile is loaded
once per group, and reads nothing at or past its sequence's length. Launches per step:

1. ``_append``: write the new token's K/V into the selection cache, the window ring and
   the raw ring; with mean pooling, emit compressed token (S - l) / d in the same program
   when the length S crosses a stride boundary (no host sync; an MLP phi is applied by the
   caller with masked tensor ops).
2. ``_cmp_split``: flash-decoding split of the compressed cache. Split s owns the tokens
   starting in selection blocks [s*BPS, (s+1)*BPS) and, in the same pass, the Eq. 9
   importance of those blocks per query head: by default each tile stores, per block, its
   probabilities weighted by their overlap with the block they start in and with the next
   one (relative to the tile's running maximum, also stored), so no token is read twice;
   otherwise a 0/1-overlap weight product per split (the l/d - 1 tokens of the previous
   block that reach into block s*BPS read again). Partial softmax state is kept relative to
   the split's running maximum.
3. ``_select``: per (sequence, KV head): the splits' maxima and sums give each head's
   normaliser; importance = sum over the group of the rescaled partials (Eq. 10); a running
   top-n over chunks of blocks with one int64 key per block (float bits above, 2**31-1-j
   below; forced blocks +inf; non-candidates -1), so equal importance goes to the lower block
   index, exactly as a stable sort does.
4. ``_attend_split``: selected blocks (each clamped to <= t) and window-ring tiles, spread
   over programs (``DecodeLaunch.target_programs``) so that batch 1 fills the GPU; one loop
   for both kinds, so the software pipeline keeps one set of tile buffers.
5. ``_combine``: per (sequence, query head): merge the three branches' partials, gate.

Importance accumulates in fp32 (the PyTorch path sums in float64): exact near-ties may
break differently, as in the training selection kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .nsa import dot_precision


@dataclass(frozen=True)
class DecodeLaunch:
    """Launch constants of the decode kernels (validated at construction).

    block_n: compressed tokens per tile of the split pass; block_k: selected/window keys per
    tile; target_programs: programs the two split passes aim for (a few per SM); max_splits:
    most splits of the compressed cache per (sequence, KV head) (the combine loads them all
    at once); select_chunk: most blocks per top-n merge (1024: two merges at 128k tokens and
    l' = 64 took 13.1 against 17.1 us at batch 1 and 40.7 against 57.3 us at batch 64 for one
    2048-wide top-k, H100, docs/inference.md);
    select_tail: the blocks after the last whole chunk in chunks of this many (0: one more
    whole chunk; at 128k + 1 tokens that chunk holds one candidate);
    num_warps: warps of the split kernels;
    topk_merge: merge the running top-n with tl.topk / tl.bitonic_merge when available;
    cmp_blockwise: the split pass sums importance per block from each tile's probabilities
    (where l'/d is a power of two), else by a [tokens x blocks] weight product with the
    previous split's lead tokens read again; cmp_max_bps: most selection blocks a split while
    the splits stay within max_splits;
    attend_upp: selected blocks (or window units) a program of the selected/window pass, 0:
    the fewest tile loops (padding included) with about target_programs programs;
    attend_one_loop: that pass runs selected and window tiles in one loop (one set of
    pipeline buffers), else in two;
    cmp_warps / attend_warps / select_warps (0: num_warps, num_warps, 8 for a chunk of 1024
    blocks or more at fewer than target_programs / 4 programs, else 4) and cmp_stages / attend_stages (0: 3, or 2 where a stage passes
    48 KiB): per-kernel warps and software-pipeline stages; cmp_maxnreg: most registers a
    thread of the split pass (0: the compiler's choice; fewer fit more programs an SM).
    """

    block_n: int = 64
    block_k: int = 64
    target_programs: int = 528
    max_splits: int = 64
    select_chunk: int = 1024
    num_warps: int = 4
    topk_merge: bool = True  # tl.topk + tl.bitonic_merge where this Triton has them, else sorts
    # the split pass: importance per tile or per split, split size, warps, stages, registers
    cmp_blockwise: bool = True
    cmp_max_bps: int = 64
    cmp_warps: int = 0
    cmp_stages: int = 0
    cmp_maxnreg: int = 0
    select_warps: int = 0  # the top-n: warps, chunk width after the whole chunks (0: whole chunks only)
    select_tail: int = 0
    # the selected + window pass: one loop or two, units a program, warps, stages
    attend_one_loop: bool = True
    attend_upp: int = 0
    attend_warps: int = 0
    attend_stages: int = 0

    def __post_init__(self):
        for name in ("block_n", "block_k", "max_splits", "select_chunk", "num_warps", "cmp_max_bps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"DecodeLaunch.{name} must be a positive power of two, got {v!r}")
        for name in ("cmp_warps", "attend_warps", "select_warps", "select_tail"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0 or v & (v - 1):
                raise ValueError(f"DecodeLaunch.{name} must be 0 (automatic or off) or a power of two, got {v!r}")
        for name in ("attend_upp", "cmp_stages", "attend_stages", "cmp_maxnreg"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"DecodeLaunch.{name} must be an integer >= 0 (0: automatic), got {v!r}")
        if self.block_n < 16 or self.block_k < 16:
            raise ValueError("DecodeLaunch.block_n and block_k must be >= 16 (matrix-product tiles)")
        if not isinstance(self.target_programs, int) or self.target_programs < 1:
            raise ValueError(f"DecodeLaunch.target_programs must be a positive integer, got {self.target_programs!r}")
        for name in ("topk_merge", "cmp_blockwise", "attend_one_loop"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DecodeLaunch.{name} must be True or False, got {getattr(self, name)!r}")


DEFAULT_LAUNCH = DecodeLaunch()
HAS_TOPK_MERGE = hasattr(tl, "bitonic_merge") and hasattr(tl, "topk")
NEG_INF = tl.constexpr(float("-inf"))  # jit functions read globals only as constexpr


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _group_queries(Q, bq0, DK, G: tl.constexpr, GP: tl.constexpr, BDK: tl.constexpr):
    """The group's queries [GP, BDK] (rows >= G and columns >= DK are 0) from row bq0."""
    g = tl.arange(0, GP)
    dk = tl.arange(0, BDK)
    return tl.load(Q + (bq0 + g)[:, None] * DK + dk[None, :], mask=(g < G)[:, None] & (dk < DK)[None, :],
                   other=0.0), dk


@triton.jit
def _rows(PTR, row, ok, D, BD: tl.constexpr):
    """Load rows ``row`` (int64 element offsets / D) of width D: [n, BD]."""
    d = tl.arange(0, BD)
    return tl.load(PTR + row[:, None] * D + d[None, :], mask=ok[:, None] & (d < D)[None, :], other=0.0)


@triton.jit
def _rows_t(PTR, row, ok, D, BD: tl.constexpr):
    """``_rows`` transposed: [BD, n] (the compiler wants one return shape per function)."""
    d = tl.arange(0, BD)
    return tl.load(PTR + row[None, :] * D + d[:, None], mask=ok[None, :] & (d < D)[:, None], other=0.0)


@triton.jit
def _online(q, kt, v, ok, m, lsum, acc, scale2, PREC: tl.constexpr):
    """One tile of an online softmax in base 2: scores of q [GP, BDK] against kt [BDK, n]
    for the keys ``ok``; returns the updated (max, sum, output accumulator)."""
    s = tl.dot(q, kt, input_precision=PREC) * scale2
    s = tl.where(ok[None, :], s, NEG_INF)
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)  # nothing seen yet: keep everything 0
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    lsum = lsum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, lsum, acc


@triton.jit
def _store_partial(MP, LP, OP, part, m, lsum, acc, DV, G: tl.constexpr, GP: tl.constexpr, BDV: tl.constexpr):
    """Partial softmax state of one program: MP/LP [.., G] at ``part`` * G, OP [.., G, DV]."""
    g = tl.arange(0, GP)
    dv = tl.arange(0, BDV)
    tl.store(MP + part * G + g, m, mask=g < G)
    tl.store(LP + part * G + g, lsum, mask=g < G)
    tl.store(OP + (part * G + g)[:, None] * DV + dv[None, :], acc, mask=(g < G)[:, None] & (dv < DV)[None, :])


# ----------------------------------------------------------------------------- 1. append
@triton.jit
def _append(NEW_KS, NEW_VS, NEW_KW, NEW_VW, NEW_KR, NEW_VR, KS, VS, KW, VW, KR, VR, KC, VC, LEN,
            H, CAP, W, NCAP, DK, DV, L: tl.constexpr, DS: tl.constexpr, LP2: tl.constexpr,
            BDK: tl.constexpr, BDV: tl.constexpr, HAS_WIN: tl.constexpr, MEAN: tl.constexpr):
    """Program (b, h): the token at pos = lengths[b] into every cache; mean-pooled emission."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    pos = tl.load(LEN + b)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    kmask, vmask = dk < DK, dv < DV
    # the host refuses full caches; a CUDA-graph warm-up must not write past them (scalar
    # conditions are broadcast by hand: Triton's interpreter rejects a 0-d mask operand)
    kmask, vmask = kmask & (dk * 0 + pos < CAP), vmask & (dv * 0 + pos < CAP)
    row = (b * CAP + pos) * H + h
    tl.store(KS + row * DK + dk, tl.load(NEW_KS + bh * DK + dk, mask=kmask), mask=kmask)
    tl.store(VS + row * DV + dv, tl.load(NEW_VS + bh * DV + dv, mask=vmask), mask=vmask)
    if HAS_WIN:
        row = (b * W + pos % W) * H + h
        tl.store(KW + row * DK + dk, tl.load(NEW_KW + bh * DK + dk, mask=kmask), mask=kmask)
        tl.store(VW + row * DV + dv, tl.load(NEW_VW + bh * DV + dv, mask=vmask), mask=vmask)
    k_new = tl.load(NEW_KR + bh * DK + dk, mask=kmask)
    v_new = tl.load(NEW_VR + bh * DV + dv, mask=vmask)
    slot = pos % L
    tl.store(KR + ((b * L + slot) * H + h) * DK + dk, k_new, mask=kmask)
    tl.store(VR + ((b * L + slot) * H + h) * DV + dv, v_new, mask=vmask)
    S = pos + 1
    if MEAN:
        if (S >= L) & ((S - L) % DS == 0):
            # the ring holds positions S-l..S-1; the new one is added from registers rather
            # than read back after this program's own store
            r = tl.arange(0, LP2)
            others = (r < L) & (r != slot)
            ring = (b * L + r) * H + h
            ks = tl.sum(_rows(KR, ring, others, DK, BDK).to(tl.float32), 0) + k_new.to(tl.float32)
            vs = tl.sum(_rows(VR, ring, others, DV, BDV).to(tl.float32), 0) + v_new.to(tl.float32)
            i = (S - L) // DS
            crow = (b * NCAP + i) * H + h
            tl.store(KC + crow * DK + dk, (ks / L).to(KC.dtype.element_ty), mask=kmask & (dk * 0 + i < NCAP))
            tl.store(VC + crow * DV + dv, (vs / L).to(VC.dtype.element_ty), mask=vmask & (dv * 0 + i < NCAP))


# ----------------------------------------------------------------------------- 2. compressed split
@triton.jit
def _cmp_split(Q, KC, VC, LEN, MP, LP, OP, IMP, IMP2, MT, scale2, H, NCAP, NSB, NSPLIT, NTILE, DK, DV,
               G: tl.constexpr, GP: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
               L: tl.constexpr, DS: tl.constexpr, LS: tl.constexpr, R: tl.constexpr, LEAD: tl.constexpr,
               BPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKWISE: tl.constexpr, TB: tl.constexpr,
               PREC: tl.constexpr):
    """Program (b*H + h, split s): compressed attention over the tokens starting in blocks
    s*BPS .. (s+1)*BPS - 1 and the Eq. 9 importance of those blocks per query head.

    BLOCKWISE (R = l'/d a power of two, TB = BLOCK_N / R blocks a tile): a token overlaps the
    block it starts in and at most the next one (l <= l'), by weights that depend only on
    where in its block it starts. Each tile stores its probabilities summed per block: IMP[j]
    the tokens starting in block j, IMP2[j] those of block j - 1 that reach into j, both
    relative to the running maximum MT of the tile (``_select`` rescales them), so no token is
    read twice and no importance is held in registers. Otherwise the split's importance in
    registers by a [tokens x blocks] overlap-weight product, relative to the split's maximum
    MP, the l/d - 1 lead tokens of the previous split read again."""
    bh = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)  # loop bounds and offsets in one integer type
    b = bh // H
    h = bh % H
    S = tl.load(LEN + b)
    nv = tl.where(S >= L, (S - L) // DS + 1, 0)  # visible compressed tokens
    q, dk = _group_queries(Q, bh * G, DK, G, GP, BDK)
    own_lo = s * (BPS * R)
    own_hi = tl.minimum(own_lo + BPS * R, nv)
    g = tl.arange(0, GP)
    j = s * BPS + tl.arange(0, BPS)
    m = tl.full([GP], NEG_INF, tl.float32)
    lsum = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BDV], tl.float32)
    imp = tl.zeros([GP, BPS], tl.float32)
    if BLOCKWISE:
        r = tl.arange(0, R) * DS  # where a token starts in its block
        w_own = ((tl.minimum(r + L, LS) - r) // DS).to(tl.float32)
        w_next = (tl.maximum(r + L - LS, 0) // DS).to(tl.float32)
        first = own_lo
    else:
        first = tl.maximum(own_lo - LEAD, 0)
    for i0 in range(first, own_hi, BLOCK_N):
        i = i0 + tl.arange(0, BLOCK_N)
        ok = i < own_hi  # visible; the LEAD tokens before own_lo count for importance only
        row = (b * NCAP + i) * H + h
        kt = _rows_t(KC, row, ok, DK, BDK)
        sc = tl.where(ok[None, :], tl.dot(q, kt, input_precision=PREC) * scale2, NEG_INF)
        m_new = tl.maximum(m, tl.max(sc, 1))  # finite: every tile holds a visible token
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(sc - m_new[:, None])
        v = _rows(VC, row, ok, DV, BDV)
        if BLOCKWISE:
            lsum = lsum * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            p3 = tl.reshape(p, [GP, TB, R])
            jt = i0 // R + tl.arange(0, TB)  # the tile's blocks
            gm = (g < G)[:, None]
            out = (bh * G + g)[:, None] * NSB + jt[None, :]
            tl.store(IMP + out, tl.sum(p3 * w_own[None, None, :], 2), mask=gm & (jt >= 0)[None, :])
            tl.store(IMP2 + out + 1, tl.sum(p3 * w_next[None, None, :], 2), mask=gm & (jt + 1 < NSB)[None, :])
            tl.store(MT + (bh * NTILE + i0 // BLOCK_N) * G + g, m_new, mask=g < G)
        else:
            p_own = tl.where((i >= own_lo)[None, :], p, 0.0)
            lsum = lsum * alpha + tl.sum(p_own, 1)
            acc = acc * alpha[:, None] + tl.dot(p_own.to(v.dtype), v, input_precision=PREC)
            # Eq. 9 overlap of token i ([i*d, i*d + l)) with block j ([j*l', (j+1)*l')), in strides
            lo = tl.maximum(i[:, None] * DS, j[None, :] * LS)
            hi = tl.minimum(i[:, None] * DS + L, j[None, :] * LS + LS)
            w = (tl.maximum(hi - lo, 0) // DS).to(tl.float32)
            imp = imp * alpha[:, None] + tl.dot(p, w, input_precision="ieee")
        m = m_new
    _store_partial(MP, LP, OP, bh * NSPLIT + s, m, lsum, acc, DV, G, GP, BDV)
    if not BLOCKWISE:
        jj = tl.arange(0, BPS)
        tl.store(IMP + (bh * G + g)[:, None] * NSB + j[None, :], imp, mask=(g < G)[:, None] & (jj >= 0)[None, :])


# ----------------------------------------------------------------------------- 3. top-n
@triton.jit
def _first_of_sorted(key, NP: tl.constexpr, BJ: tl.constexpr):
    """The first NP entries of a sorted [BJ] (BJ a multiple of NP) as [NP]."""
    k2 = tl.reshape(key, [BJ // NP, NP])
    part = tl.arange(0, BJ // NP)
    return tl.sum(tl.where((part == 0)[:, None], k2, 0), 0)


@triton.jit
def _weighted(IMP, MX, rows, bh, j, jm, g, mx, inv, NSB, NROW, G: tl.constexpr):
    """sum over the group of exp2(MX[rows] - mx) / total * IMP[j] ([BJ], blocks ``jm``): Eq. 10
    with each partial importance rescaled from the maximum it was taken against (row ``rows``
    of MX); one head at a time, so a wide chunk holds [BJ] vectors, not [G, BJ] tiles."""
    out = tl.zeros([j.shape[0]], tl.float32)
    for gi in tl.static_range(G):
        mg = tl.sum(tl.where(g == gi, mx, 0.0), 0)
        ig = tl.sum(tl.where(g == gi, inv, 0.0), 0)
        part = tl.load(IMP + (bh * G + gi) * NSB + j, mask=jm, other=0.0)
        mj = tl.load(MX + (bh * NROW + rows) * G + gi, mask=jm, other=NEG_INF)
        out += tl.where(jm, tl.exp2(mj - mg) * ig * part, 0.0)
    return out


@triton.jit
def _merge_chunk(top, j0, cur, IMP, IMP2, MT, MP, bh, g, mx, inv, NSB, NSPLIT, NTILE, G: tl.constexpr,
                 BPS: tl.constexpr, TB: tl.constexpr, NP: tl.constexpr, BJ: tl.constexpr, MERGE: tl.constexpr,
                 BLOCKWISE: tl.constexpr):
    """The running top-n keys ``top`` [NP] merged with the keys of blocks j0 .. j0 + BJ - 1."""
    j = j0 + tl.arange(0, BJ)
    # blocks before the current one: the current block is forced (its tile may not have run)
    jm = (j < cur) & (j < NSB)
    if BLOCKWISE:
        imp = _weighted(IMP, MT, j // TB, bh, j, jm, g, mx, inv, NSB, NTILE, G)
        imp += _weighted(IMP2, MT, (j - 1) // TB, bh, j, jm & (j >= 1), g, mx, inv, NSB, NTILE, G)
    else:
        imp = _weighted(IMP, MP, j // BPS, bh, j, jm, g, mx, inv, NSB, NSPLIT, G)
    forced = (j == 0) | (j == cur) | (j == cur - 1)
    bits = tl.where(forced, 0x7F800000, imp.to(tl.int32, bitcast=True).to(tl.int64))
    key = tl.where(j <= cur, bits * 4294967296 + (2147483647 - j), -1)
    # the chunk's NP largest against the running top: their element-wise max holds the NP
    # largest of both (keys are distinct), sorted by a merge or a sort
    if MERGE:
        top = tl.bitonic_merge(tl.maximum(top, tl.topk(key, NP)))
    else:
        key = tl.sort(key, descending=True)
        if BJ > NP:
            key = _first_of_sorted(key, NP, BJ)
        top = tl.sort(tl.maximum(top, key))
    return top


@triton.jit
def _select(MP, LP, IMP, IMP2, MT, LEN, OUT, H, NSB, NSPLIT, NTILE, G: tl.constexpr, GC: tl.constexpr,
            NSP: tl.constexpr, LS: tl.constexpr, BPS: tl.constexpr, TB: tl.constexpr, NSEL: tl.constexpr,
            NP: tl.constexpr, BJ: tl.constexpr, TAIL: tl.constexpr, MERGE: tl.constexpr, BLOCKWISE: tl.constexpr):
    """Program (b*H + h): group importance of every candidate block and the top-n, in chunks
    of BJ blocks (TAIL > 0: whole chunks of BJ, then the rest in chunks of TAIL). BLOCKWISE:
    IMP[j] + IMP2[j] relative to the maxima of their tiles (MT rows j // TB and (j - 1) // TB),
    else IMP[j] relative to its split's maximum (MP row j // BPS)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    t = tl.load(LEN + b) - 1
    cur = t // LS
    sp = tl.arange(0, NSP)
    g = tl.arange(0, GC)
    smask = (sp < NSPLIT)[:, None] & (g < G)[None, :]
    mm = tl.load(MP + (bh * NSPLIT + sp)[:, None] * G + g[None, :], mask=smask, other=NEG_INF)
    ll = tl.load(LP + (bh * NSPLIT + sp)[:, None] * G + g[None, :], mask=smask, other=0.0)
    mx = tl.max(mm, 0)
    mx = tl.where(mx == NEG_INF, 0.0, mx)
    total = tl.sum(tl.exp2(mm - mx[None, :]) * ll, 0)  # [GC]: each head's softmax denominator
    inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
    top = tl.full([NP], -1, tl.int64)  # the running top-n keys, ascending
    whole = cur + 1
    if TAIL > 0:
        whole = (cur + 1) // BJ * BJ
    for j0 in range(0, whole, BJ):
        top = _merge_chunk(top, j0, cur, IMP, IMP2, MT, MP, bh, g, mx, inv, NSB, NSPLIT, NTILE, G, BPS, TB, NP, BJ,
                           MERGE, BLOCKWISE)
    if TAIL > 0:
        for j0 in range(whole, cur + 1, TAIL):
            top = _merge_chunk(top, j0, cur, IMP, IMP2, MT, MP, bh, g, mx, inv, NSB, NSPLIT, NTILE, G, BPS, TB, NP,
                               TAIL, MERGE, BLOCKWISE)
    col = tl.arange(0, NP)
    keep = (top >= 0) & (col >= NP - NSEL)
    blk = tl.sort(tl.where(keep, 2147483647 - (top & 0xFFFFFFFF), 2147483647).to(tl.int32))
    tl.store(OUT + bh * NSEL + col, tl.where(blk == 2147483647, -1, blk).to(tl.int64), mask=col < NSEL)


# ----------------------------------------------------------------------------- 4. selected + window
@triton.jit
def _attend_split(Q, KS, VS, KW, VW, IDX, LEN, MP, LP, OP, scale2, H, CAP, W, NSEL, PS, NPART, DK, DV,
                  G: tl.constexpr, GP: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
                  LS: tl.constexpr, BLOCK_K: tl.constexpr, KT: tl.constexpr, UPP: tl.constexpr,
                  ONE_LOOP: tl.constexpr, PREC: tl.constexpr):
    """Program (b*H + h, u): u < PS takes UPP selected blocks, else UPP window units (KT
    tiles of the ring each with ONE_LOOP, else one). ONE_LOOP: both kinds in one loop of
    UPP * KT tiles from pointers chosen once, so the software pipeline keeps one set of tile
    buffers (two loops keep two: twice the shared memory, fewer programs an SM)."""
    bh = tl.program_id(0).to(tl.int64)
    u = tl.program_id(1)
    b = bh // H
    h = bh % H
    S = tl.load(LEN + b)
    q, dk = _group_queries(Q, bh * G, DK, G, GP, BDK)
    m = tl.full([GP], NEG_INF, tl.float32)
    lsum = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BDV], tl.float32)
    c = tl.arange(0, BLOCK_K)
    if ONE_LOOP:
        sel = u < PS
        if sel:
            kb, vb, rows0 = KS, VS, b * CAP
        else:
            kb, vb, rows0 = KW, VW, b * W
        for k in range(UPP * KT):
            slot = u * UPP + k // KT
            off = (k % KT) * BLOCK_K + c
            blk = tl.load(IDX + bh * NSEL + slot, mask=sel & (slot < NSEL), other=-1)
            pos = blk * LS + off  # selected: blk = -1 (padding) gives pos < 0
            ring = ((u - PS) * UPP + k // KT) * (KT * BLOCK_K) + off  # window: a ring slot
            # ring slots hold the last min(w, S) positions
            ok = tl.where(sel, (pos >= 0) & (off < LS) & (pos < S), (ring < W) & (ring < S))
            row = (rows0 + tl.where(sel, pos, ring)) * H + h
            m, lsum, acc = _online(q, _rows_t(kb, row, ok, DK, BDK), _rows(vb, row, ok, DV, BDV),
                                   ok, m, lsum, acc, scale2, PREC)
    elif u < PS:
        for k in range(UPP):
            slot = u * UPP + k
            blk = tl.load(IDX + bh * NSEL + slot, mask=slot < NSEL, other=-1)
            for kt in tl.static_range(KT):
                off = kt * BLOCK_K + c
                pos = blk * LS + off
                ok = (pos >= 0) & (off < LS) & (pos < S)  # blk = -1 (padding) gives pos < 0
                row = (b * CAP + pos) * H + h
                m, lsum, acc = _online(q, _rows_t(KS, row, ok, DK, BDK), _rows(VS, row, ok, DV, BDV),
                                       ok, m, lsum, acc, scale2, PREC)
    else:
        for k in range(UPP):
            slot = ((u - PS) * UPP + k) * BLOCK_K + c
            ok = (slot < W) & (slot < S)  # ring slots holding one of the last min(w, S) positions
            row = (b * W + slot) * H + h
            m, lsum, acc = _online(q, _rows_t(KW, row, ok, DK, BDK), _rows(VW, row, ok, DV, BDV),
                                   ok, m, lsum, acc, scale2, PREC)
    _store_partial(MP, LP, OP, bh * NPART + u, m, lsum, acc, DV, G, GP, BDV)


# ----------------------------------------------------------------------------- 5. combine
@triton.jit
def _merge(MP, LP, OP, base, g, lo, hi, DV, G: tl.constexpr, NPP: tl.constexpr, BDV: tl.constexpr):
    """Softmax output of query head g from partials lo..hi-1 (rows ``base`` + p): [BDV] fp32."""
    p = lo + tl.arange(0, NPP)
    ok = p < hi
    m = tl.load(MP + (base + p) * G + g, mask=ok, other=NEG_INF)
    lsum = tl.load(LP + (base + p) * G + g, mask=ok, other=0.0)
    mx = tl.max(m, 0)
    c = tl.exp2(m - tl.where(mx == NEG_INF, 0.0, mx))
    dv = tl.arange(0, BDV)
    o = tl.load(OP + ((base + p) * G + g)[:, None] * DV + dv[None, :], mask=ok[:, None] & (dv < DV)[None, :],
                other=0.0)
    total = tl.sum(c * lsum, 0)
    return tl.sum(c[:, None] * o, 0) / tl.where(total > 0, total, 1.0)


@triton.jit
def _combine(MPC, LPC, OPC, MPA, LPA, OPA, GATES, O, HQ, NSPLIT, PS, NPART, DV,
             G: tl.constexpr, NCP: tl.constexpr, NAP: tl.constexpr, BDV: tl.constexpr):
    """Program (b*HQ + query head): o = g_cmp*o_cmp + g_sel*o_sel + g_win*o_win."""
    bq = tl.program_id(0).to(tl.int64)
    bh = bq // G
    g = bq % G
    o_cmp = _merge(MPC, LPC, OPC, bh * NSPLIT, g, 0, NSPLIT, DV, G, NCP, BDV)
    o_sel = _merge(MPA, LPA, OPA, bh * NPART, g, 0, PS, DV, G, NAP, BDV)
    o_win = _merge(MPA, LPA, OPA, bh * NPART, g, PS, NPART, DV, G, NAP, BDV)
    gc = tl.load(GATES + bq * 3).to(tl.float32)
    gs = tl.load(GATES + bq * 3 + 1).to(tl.float32)
    gw = tl.load(GATES + bq * 3 + 2).to(tl.float32)
    dv = tl.arange(0, BDV)
    tl.store(O + bq * DV + dv, gc * o_cmp + gs * o_sel + gw * o_win, mask=dv < DV)


# ----------------------------------------------------------------------------- launchers
def _p2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))


def _stages(keys: int, bdk: int, bdv: int, t: torch.Tensor, asked: int = 0) -> int:
    """Pipeline stages of a split kernel: ``asked``, or 3, or 2 where a stage's K and V tiles
    pass 48 KiB (fp32 at head_dim 128 and up), so that the stages fit a Hopper SM's shared
    memory."""
    if asked:
        return asked
    return 2 if keys * (bdk + bdv) * t.element_size() > 48 * 1024 else 3


def append_token(new: dict, k_sel, v_sel, k_win, v_win, k_raw, v_raw, k_cmp, v_cmp, lengths: torch.Tensor,
                 cfg, mean_pool: bool) -> None:
    """Write one token per sequence at position lengths[b] (lengths are not advanced here).

    new: ``k_sel, v_sel, k_win, v_win, k_raw, v_raw`` [B, H, D] (RoPE'd keys); caches as in
    the module docstring (k_win None when w = 0). With ``mean_pool`` the compressed token
    due at the new length is emitted too (otherwise the caller applies phi).
    """
    B, _, H, DK = k_sel.shape
    DV = v_sel.shape[-1]
    nc = k_cmp.shape[1]
    has_win = k_win is not None
    kw, vw = (k_win, v_win) if has_win else (k_sel, v_sel)
    src = [new[n].contiguous() for n in ("k_sel", "v_sel", "k_win", "v_win", "k_raw", "v_raw")]
    kc, vc = (k_cmp, v_cmp) if nc else (k_raw, v_raw)  # no compressed token fits: never emitted
    _append[(B * H,)](*src, k_sel, v_sel, kw, vw, k_raw, v_raw, kc, vc, lengths, H, k_sel.shape[1],
                      kw.shape[1], nc, DK, DV, L=cfg.cmp_block, DS=cfg.cmp_stride, LP2=_p2(cfg.cmp_block),
                      BDK=_p2(DK), BDV=_p2(DV), HAS_WIN=has_win, MEAN=mean_pool and nc > 0, num_warps=1)


def _select_warps(bj: int, programs: int, launch: DecodeLaunch) -> int:
    """Warps of the top-n: 8 for a chunk of 1024 blocks or more while its programs are about
    one per SM or fewer (each program's time is the step's), else 4 (more programs an SM)."""
    return 8 if bj >= 1024 and 4 * programs < launch.target_programs else 4


def _blockwise(cfg, launch: DecodeLaunch) -> bool:
    """Whether the split pass sums importance per block (``_cmp_split`` BLOCKWISE): asked for,
    and a tile holds whole blocks of token starts (R = l'/d a power of two, at most block_n)."""
    R = cfg.sel_block // cfg.cmp_stride
    return launch.cmp_blockwise and R & (R - 1) == 0 and R <= launch.block_n


def _cmp_geometry(ncap: int, B: int, H: int, cfg, launch: DecodeLaunch) -> tuple[int, int]:
    """(blocks per split BPS, splits) of the compressed cache: about target_programs programs,
    at most max_splits splits, at least one tile of tokens a split."""
    R = cfg.sel_block // cfg.cmp_stride
    blocks = max(1, -(-ncap // R))  # blocks in which a compressed token starts
    want = max(1, launch.target_programs // (B * H))
    low = max(16, _p2(-(-launch.block_n // R)))  # a matrix-product dimension; one tile of tokens
    # at most cmp_max_bps blocks a split while that keeps max_splits: the [G, BPS] importance
    # stays in registers
    bps = max(low, min(_p2(-(-blocks // want)), launch.cmp_max_bps), _p2(-(-blocks // launch.max_splits)))
    return bps, -(-blocks // bps)


def _attend_geometry(n: int, wtiles: int, B: int, H: int, launch: DecodeLaunch) -> tuple[int, int, int]:
    """(units per program, selected programs, window programs): a unit is one selected block
    or one window tile. ``launch.attend_upp`` or, up to the units that leave about
    target_programs programs, the most units with the fewest loop passes in all: every
    program of a kind loops over as many units, padding included (n = 16 and 8 window tiles
    at one program per (sequence, KV head) wanted: 8 units, three programs, no padding)."""
    if launch.attend_upp:
        upp = launch.attend_upp
    else:
        most = max(1, -(-(n + wtiles) // max(1, launch.target_programs // (B * H))))
        upp = min(range(1, most + 1), key=lambda u: ((-(-n // u) + -(-wtiles // u)) * u, -u))
    return upp, -(-n // upp), -(-wtiles // upp)


def decode_attend(q: torch.Tensor, gates: torch.Tensor, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp,
                  lengths: torch.Tensor, cfg, scale: float, launch: DecodeLaunch = DEFAULT_LAUNCH):
    """The NSA function for the newest query of each sequence, over its caches.

    q: [B, HQ, Dk] at positions lengths - 1 (token already appended); gates: [B, HQ, 3];
    caches as in the module docstring; lengths: [B] int64 on q's device, >= 1.
    Returns (o [B, HQ, Dv] fp32, indices [B, H, n] int64, ascending, -1 padded).
    Every grid depends on the shapes only (cache capacity, batch), never on the lengths: no
    host sync, and the launches can be captured in a CUDA graph.
    """
    B, HQ, DK = q.shape
    _, cap, H, DV = v_sel.shape
    G = HQ // H
    GP = max(16, _p2(G))
    n, ls, l, d = cfg.num_selected, cfg.sel_block, cfg.cmp_block, cfg.cmp_stride
    dev = q.device
    prec = dot_precision(q.dtype)  # fp32 as PyTorch's fp32 matmuls: full precision unless TF32 is allowed
    scale2 = scale * 1.4426950408889634
    q = q.contiguous()
    BDK, BDV = max(16, _p2(DK)), max(16, _p2(DV))
    f32 = dict(device=dev, dtype=torch.float32)

    # compressed branch + importance
    ncap = k_cmp.shape[1]
    kc, vc = (k_cmp, v_cmp) if ncap else (k_sel, v_sel)  # nothing to read: any valid pointer
    bps, nsplit = _cmp_geometry(ncap, B, H, cfg, launch)
    blockwise, R = _blockwise(cfg, launch), ls // d
    tb = launch.block_n // R if blockwise else 1
    nsb, ntile = bps * nsplit, bps * nsplit // tb
    mpc, lpc = torch.empty(B * H * nsplit, G, **f32), torch.empty(B * H * nsplit, G, **f32)
    opc = torch.empty(B * H * nsplit, G, DV, **f32)
    imp = torch.empty(B * H, G, nsb, **f32)
    # per-tile importance parts and maxima (BLOCKWISE; else never read)
    imp2, mt = (torch.empty(B * H, G, nsb, **f32), torch.empty(B * H * ntile, G, **f32)) if blockwise else (imp, mpc)
    _cmp_split[(B * H, nsplit)](q, kc, vc, lengths, mpc, lpc, opc, imp, imp2, mt, scale2, H, max(ncap, 1), nsb,
                                nsplit, ntile, DK, DV, G=G, GP=GP, BDK=BDK, BDV=BDV, L=l, DS=d, LS=ls, R=R,
                                LEAD=l // d - 1, BPS=bps, BLOCK_N=launch.block_n, BLOCKWISE=blockwise, TB=tb,
                                PREC=prec, num_warps=launch.cmp_warps or launch.num_warps,
                                num_stages=_stages(launch.block_n, BDK, BDV, kc, launch.cmp_stages),
                                **({"maxnreg": launch.cmp_maxnreg} if launch.cmp_maxnreg else {}))

    # importance and top-n
    NP = max(16, _p2(n))
    GC = _p2(G)
    BJ = max(NP, min(launch.select_chunk, _p2(nsb), max(1, 8192 // GC)))  # [GC, BJ] loads stay in registers
    tail = min(BJ, max(NP, launch.select_tail)) if launch.select_tail else 0
    idx = torch.empty(B, H, n, dtype=torch.long, device=dev)
    _select[(B * H,)](mpc, lpc, imp, imp2, mt, lengths, idx, H, nsb, nsplit, ntile, G=G, GC=GC, NSP=_p2(nsplit),
                      LS=ls, BPS=bps, TB=tb, NSEL=n, NP=NP, BJ=BJ, TAIL=tail, MERGE=HAS_TOPK_MERGE and launch.topk_merge,
                      BLOCKWISE=blockwise, num_warps=launch.select_warps or _select_warps(BJ, B * H, launch))

    # selected blocks and window
    block_k = min(launch.block_k, max(16, _p2(ls)))
    kt = -(-ls // block_k)
    w = cfg.window
    wtiles = -(-w // (block_k * (kt if launch.attend_one_loop else 1))) if w else 0
    upp, ps, pw = _attend_geometry(n, wtiles, B, H, launch)
    npart = ps + pw
    mpa, lpa = torch.empty(B * H * npart, G, **f32), torch.empty(B * H * npart, G, **f32)
    opa = torch.empty(B * H * npart, G, DV, **f32)
    kw, vw = (k_win, v_win) if w else (k_sel, v_sel)
    _attend_split[(B * H, npart)](q, k_sel, v_sel, kw, vw, idx, lengths, mpa, lpa, opa, scale2, H, cap,
                                  w, n, ps, npart, DK, DV, G=G, GP=GP, BDK=BDK, BDV=BDV,
                                  LS=ls, BLOCK_K=block_k, KT=kt, UPP=upp, ONE_LOOP=launch.attend_one_loop, PREC=prec,
                                  num_warps=launch.attend_warps or launch.num_warps,
                                  num_stages=_stages(block_k, BDK, BDV, k_sel, launch.attend_stages))

    o = torch.empty(B, HQ, DV, **f32)
    _combine[(B * HQ,)](mpc, lpc, opc, mpa, lpa, opa, gates.contiguous(), o, HQ, nsplit, ps, npart, DV, G=G,
                        NCP=_p2(nsplit), NAP=_p2(npart), BDV=BDV, num_warps=4)
    return o, idx

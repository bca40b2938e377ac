"""Block importance and top-n selection on the GPU (SPEC: selection branch).

The importance of block j for position t and KV head h is
``sum_g sum_i W[i, j] * p_cmp(t, g)[i]`` (Eq. 9 overlap weights, Eq. 10 group sum). A
program takes a tile of positions, one KV head and a chunk of blocks; it recomputes p_cmp
from the compressed log-sum-exp for just the compressed tokens overlapping those blocks,
multiplies by the overlap weights built in registers, and sums the G heads, so no
[S, Nc] probability matrix exists anywhere. Each (t, h, j) gets one int64 key: the float's
bits above, ``2**31 - 1 - j`` below, forced blocks as +inf and non-candidates as -1. Keys
are distinct, so a running top-n over the chunks picks exactly what a stable sort would:
equal importance goes to the lower block index.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .range_attn import _nvis


@triton.jit
def _first_part(x, PARTS: tl.constexpr):
    """x [R, PARTS, C] -> x[:, 0, :]: the first C of each row of a sorted [R, PARTS * C]
    (Triton has no slicing: a masked sum over one entry)."""
    part = tl.arange(0, PARTS)[None, :, None]
    return tl.sum(tl.where(part == 0, x, 0), 1)


@triton.jit
def _select_topn(Q, KC, LSE, TILES, OUT, scale2, HQ, DK,
                 G: tl.constexpr, L: tl.constexpr, DS: tl.constexpr, LS: tl.constexpr,
                 NSEL: tl.constexpr, NP: tl.constexpr, BJ: tl.constexpr, BJP: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BDK: tl.constexpr):
    """A tile of positions, one KV head: stream the blocks in chunks of BJ, keep a running top-n."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    H = HQ // G
    t0 = tl.load(TILES + tile * 5)
    t1 = tl.load(TILES + tile * 5 + 1)
    ds0 = tl.load(TILES + tile * 5 + 2)
    cs0 = tl.load(TILES + tile * 5 + 4)
    t = t0 + tl.arange(0, BLOCK_T)
    row_ok = t < t1
    tloc = t - ds0
    nv = _nvis(tloc, L, DS)
    cur = tloc // LS
    jj = tl.arange(0, BJP)
    dk = tl.arange(0, BDK)
    col = tl.arange(0, NP)
    top = tl.full([BLOCK_T, NP], -1, tl.int64)
    nv_max = _nvis(t1 - 1 - ds0, L, DS)
    for j0 in range(0, (t1 - 1 - ds0) // LS + 1, BJ):
        j = j0 + jj
        # compressed tokens overlapping blocks j0..j0+BJ-1: i*DS + L > j0*LS and i*DS < (j0+BJ)*LS
        num = j0 * LS - L
        i_lo = tl.where(num >= 0, num // DS + 1, 0)
        i_hi = tl.minimum(nv_max, ((j0 + BJ) * LS - 1) // DS + 1)
        imp = tl.zeros([BLOCK_T, BJP], tl.float32)
        for i0 in range(i_lo, i_hi, BLOCK_N):
            i = i0 + tl.arange(0, BLOCK_N)
            kc = tl.load(KC + ((cs0 + i) * H + h)[None, :] * DK + dk[:, None],
                         mask=(i < i_hi)[None, :] & (dk < DK)[:, None], other=0.0)
            lo = tl.maximum(i[:, None] * DS, j[None, :] * LS)
            hi = tl.minimum(i[:, None] * DS + L, j[None, :] * LS + LS)
            w = (tl.maximum(hi - lo, 0) // DS).to(tl.float32)  # Eq. 9 weights [BLOCK_N, BJP]
            vis = (i[None, :] < nv[:, None]) & row_ok[:, None] & (i < i_hi)[None, :]
            psum = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
            for g in range(G):  # Eq. 10: the group sum
                rq = t * HQ + h * G + g
                q = tl.load(Q + rq[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk < DK)[None, :],
                            other=0.0)
                lse = tl.load(LSE + rq, mask=row_ok, other=float("inf"))
                s = tl.dot(q, kc) * scale2
                psum += tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
            imp += tl.dot(psum, w, input_precision="ieee")
        forced = (j[None, :] == 0) | (j[None, :] == cur[:, None]) | (j[None, :] == cur[:, None] - 1)
        cand = (j[None, :] <= cur[:, None]) & (jj < BJ)[None, :]
        bits = imp.to(tl.int32, bitcast=True).to(tl.int64)
        bits = tl.where(forced, 0x7F800000, bits)
        key = tl.where(cand, bits * 4294967296 + (2147483647 - j[None, :]), -1)
        # merge: the NP largest of (running top, chunk) by one bitonic sort; valid keys are
        # distinct, so this is exactly a stable sort's choice. BJP >= NP (launch).
        if BJP > NP:  # the chunk's own NP largest first
            key = _first_part(tl.reshape(tl.sort(key, dim=1, descending=True), [BLOCK_T, BJP // NP, NP]),
                                   BJP // NP)
        both = tl.sort(tl.reshape(tl.join(top, key), [BLOCK_T, 2 * NP]), dim=1, descending=True)
        top = _first_part(tl.reshape(both, [BLOCK_T, 2, NP]), 2)
    blk = 2147483647 - (top & 0xFFFFFFFF)
    out = tl.where(top >= 0, blk, -1)
    tl.store(OUT + (t * H + h)[:, None] * NSEL + col[None, :], out,
             mask=row_ok[:, None] & (col < NSEL)[None, :])


def block_chunk(l: int, d: int, ls: int, block_n: int) -> int:
    """Blocks per program so that their overlapping compressed tokens fit one BLOCK_N tile."""
    return max(1, ((block_n - l // d + 1) * d) // ls)


def select_from_lse(q, k_cmp, lse, layout, cfg, scale2: float) -> torch.Tensor:
    """Top-n blocks from the compressed log-sum-exp (base 2, [T, HQ]).

    q: [T, HQ, Dk] packed; k_cmp: [Nc_total, H, Dk]. Returns LongTensor [T, H, n].
    """
    T, HQ, DK = q.shape
    H = k_cmp.shape[1]
    l, d, ls, n = cfg.cmp_block, cfg.cmp_stride, cfg.sel_block, cfg.num_selected
    out = torch.full((T, H, n), -1, dtype=torch.long, device=q.device)
    if T == 0:
        return out
    BLOCK_T, BLOCK_N = 64, 64
    tiles = layout.query_tiles(BLOCK_T)
    BJ = block_chunk(l, d, ls, BLOCK_N)
    NP = max(16, triton.next_power_of_2(n))
    _select_topn[(tiles.shape[0], H)](q, k_cmp, lse, tiles, out, scale2, HQ, DK, G=HQ // H, L=l, DS=d,
                                      LS=ls, NSEL=n, NP=NP, BJ=BJ, BJP=max(NP, triton.next_power_of_2(BJ)),
                                      BLOCK_T=BLOCK_T,
                                      BLOCK_N=BLOCK_N, BDK=max(16, triton.next_power_of_2(DK)))
    # the kernel emits blocks by importance; SPEC wants them ascending with -1 last
    big = torch.iinfo(torch.int64).max
    out = torch.sort(torch.where(out < 0, big, out), dim=-1).values
    return torch.where(out == big, -1, out)

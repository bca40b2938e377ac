"""Gate combination of the three branch outputs, forward and backward, as single passes.

Forward: o = g_cmp*o_cmp + g_sel*o_sel + g_win*o_win. Backward: dg_b = <do, o_b>, and the
gate folded into each branch's softmax statistics (``combine_backward``) so that the attention
backward reads do itself, all from one read of do and the branch outputs (the PyTorch
elementwise version was slow: docs/kernel_notes.md, first profile).
Rows are (position, query head); tensors are [rows, D] contiguous, gates [rows, 3].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def gate_rows(OC, OW, GATES, O, r, row_ok, d, DV, o_s, HAS_WIN: tl.constexpr):
    """o = g_cmp o_cmp + g_sel o_s + g_win o_win for rows r ([R] int64, row_ok their mask) and
    columns d: o_s is the selected branch's [R, BD] result as stored (O's dtype), the other two
    are read. Shared by ``_combine_fwd`` and the selected kernels' epilogues (``gate_fused``),
    so both round alike."""
    m = row_ok[:, None] & (d < DV)[None, :]
    off = r[:, None] * DV + d[None, :]
    g0 = tl.load(GATES + r * 3, mask=row_ok, other=0.0).to(tl.float32)
    g1 = tl.load(GATES + r * 3 + 1, mask=row_ok, other=0.0).to(tl.float32)
    o = g0[:, None] * tl.load(OC + off, mask=m, other=0.0).to(tl.float32)
    o += g1[:, None] * o_s.to(tl.float32)
    if HAS_WIN:
        g2 = tl.load(GATES + r * 3 + 2, mask=row_ok, other=0.0).to(tl.float32)
        o += g2[:, None] * tl.load(OW + off, mask=m, other=0.0).to(tl.float32)
    tl.store(O + off, o.to(O.dtype.element_ty), mask=m)


@triton.jit
def _combine_fwd(OC, OS, OW, GATES, O, R, DV, HAS_WIN: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    o_s = tl.load(OS + r[:, None] * DV + d[None, :], mask=(r < R)[:, None] & (d < DV)[None, :], other=0.0)
    gate_rows(OC, OW, GATES, O, r, r < R, d, DV, o_s, HAS_WIN)


@triton.jit
def gate_stats(do, OB, LSE, GATES, DG, LSEG, DELTA, r, row_ok, d, DV, R, b: tl.constexpr):
    """Branch b's part of the gate backward for rows r ([R'] int64 of R rows, row_ok their mask),
    do the rows' output gradient [R', BD] fp32: dg_b = <do, o_b> into DG [R, 3] and DELTA[b]
    ([3, R]), lse_b - log2(g_b) into LSEG[b]; returns (lse_b - log2 g_b, <do, o_b>). Shared by
    ``_combine_bwd`` and the range dq's prologue (``gate_bwd_fused``, through ``gate_backward``),
    so both compute alike."""
    ob = tl.load(OB + r[:, None] * DV + d[None, :], mask=row_ok[:, None] & (d < DV)[None, :], other=0.0)
    lse = tl.load(LSE + r, mask=row_ok, other=0.0)
    g = tl.load(GATES + r * 3 + b, mask=row_ok, other=0.0).to(tl.float32)
    dg = tl.sum(do * ob.to(tl.float32), 1)
    tl.store(DG + r * 3 + b, dg, mask=row_ok)
    tl.store(DELTA + b * R + r, dg, mask=row_ok)
    # g*P = exp2(s - (lse - log2 g)); g = 0: +inf (no gradient); g < 0: NaN (outside
    # the contract, loud); lse = +inf (a row that saw no key) stays +inf
    safe = tl.where(g > 0, g, 1.0)
    lse_g = tl.where(g > 0, lse - tl.log2(safe), tl.where(g == 0, float("inf"), float("nan")))
    tl.store(LSEG + b * R + r, lse_g, mask=row_ok)
    return lse_g, dg


@triton.jit
def gate_backward(do, OC, OS, OW, LSE_C, LSE_S, LSE_W, GATES, DG, LSEG, DELTA, r, row_ok, d, DV, R,
                  HAS_WIN: tl.constexpr):
    """``gate_stats`` of the three branches (compressed, selected, window: rows 0, 1, 2; without
    a window its dg is 0 and its rows of LSEG / DELTA are left as they are); returns
    (lse_c, delta_c, lse_s, delta_s, lse_w, delta_w), the window's the compressed's without one."""
    lse_c, delta_c = gate_stats(do, OC, LSE_C, GATES, DG, LSEG, DELTA, r, row_ok, d, DV, R, 0)
    lse_s, delta_s = gate_stats(do, OS, LSE_S, GATES, DG, LSEG, DELTA, r, row_ok, d, DV, R, 1)
    if HAS_WIN:
        lse_w, delta_w = gate_stats(do, OW, LSE_W, GATES, DG, LSEG, DELTA, r, row_ok, d, DV, R, 2)
    else:
        tl.store(DG + r * 3 + 2, tl.zeros_like(delta_c), mask=row_ok)
        lse_w, delta_w = lse_c, delta_c
    return lse_c, delta_c, lse_s, delta_s, lse_w, delta_w


@triton.jit
def _combine_bwd(DO, OC, OS, OW, GATES, LSE_C, LSE_S, LSE_W, DG, LSEG, DELTA, R, DV,
                 HAS_WIN: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    rm = r < R
    do = tl.load(DO + r[:, None] * DV + d[None, :], mask=rm[:, None] & (d < DV)[None, :], other=0.0).to(tl.float32)
    gate_backward(do, OC, OS, OW, LSE_C, LSE_S, LSE_W, GATES, DG, LSEG, DELTA, r, rm, d, DV, R, HAS_WIN)


def combine(o_c, o_s, o_w, gates, rows: int):
    """o [T, HQ, DV] in o_c's dtype from the branch outputs and gates [T, HQ, 3] (o_w may be None);
    ``rows`` (position, head) rows per program."""
    T, HQ, DV = o_c.shape
    R = T * HQ
    o = torch.empty_like(o_c)
    if R:
        _combine_fwd[(triton.cdiv(R, rows),)](o_c, o_s, o_c if o_w is None else o_w, gates, o, R, DV,
                                              HAS_WIN=o_w is not None, BR=rows,
                                              BD=max(16, triton.next_power_of_2(DV)))
    return o


def combine_backward(do, o_c, o_s, o_w, gates, lses, rows: int):
    """The gate combination's backward, folded into the branches' softmax statistics.

    do, o_c, o_s, o_w: [T, HQ, DV] (o_w may be None); gates [T, HQ, 3]; lses: the branches'
    base-2 log-sum-exps (lse_c, lse_s, lse_w) [T, HQ] fp32 (lse_w None without a window).
    Branch b's output gradient is g_b*do, so its attention backward needs P*g_b and
    dP*g_b - g_b*<do, o_b>: the same as with do itself, lse_b - log2(g_b) and delta <do, o_b>.
    Returns dg [T, HQ, 3] fp32, those log-sum-exps [3, T, HQ] and deltas [3, T, HQ] (fp32);
    the attention backward reads do itself for every branch (no g_b*do copies are written).
    Gates must be >= 0 (SPEC's sigmoid): a negative gate's rows get NaN gradients.
    """
    T, HQ, DV = o_c.shape
    R = T * HQ
    dg, lse_g, delta = gate_stat_buffers(T, HQ, o_w is not None, do.device)
    lse_c, lse_s, lse_w = lses
    if R:
        _combine_bwd[(triton.cdiv(R, rows),)](do, o_c, o_s, o_c if o_w is None else o_w, gates, lse_c, lse_s,
                                              lse_c if lse_w is None else lse_w, dg, lse_g, delta, R, DV,
                                              HAS_WIN=o_w is not None, BR=rows,
                                              BD=max(16, triton.next_power_of_2(DV)))
    return dg, lse_g, delta


def gate_stat_buffers(T: int, HQ: int, has_win: bool, device) -> tuple:
    """(dg [T, HQ, 3], lse_g [3, T, HQ], delta [3, T, HQ]) fp32 for the gate backward: every
    row is written, the window's lse_g / delta rows only with a window branch (zeros else)."""
    alloc = torch.empty if has_win else torch.zeros
    return (torch.empty(T, HQ, 3, dtype=torch.float32, device=device),
            alloc(3, T, HQ, dtype=torch.float32, device=device), alloc(3, T, HQ, dtype=torch.float32, device=device))

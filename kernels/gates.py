"""Gate combination of the three branch outputs, forward and backward, as single passes.

Forward: o = g_cmp*o_cmp + g_sel*o_sel + g_win*o_win. Backward: dg_b = <do, o_b>, the branch
gradients do_b = g_b*do and the softmax corrections delta_b = g_b*dg_b, all from one read of
do and the branch outputs (the PyTorch elementwise version was slow: docs/kernel_notes.md, first profile).
Rows are (position, query head); tensors are [rows, D] contiguous, gates [rows, 3].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _combine_fwd(OC, OS, OW, GATES, O, R, DV, HAS_WIN: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    m = (r < R)[:, None] & (d < DV)[None, :]
    off = r[:, None] * DV + d[None, :]
    g0 = tl.load(GATES + r * 3, mask=r < R, other=0.0).to(tl.float32)
    g1 = tl.load(GATES + r * 3 + 1, mask=r < R, other=0.0).to(tl.float32)
    o = g0[:, None] * tl.load(OC + off, mask=m, other=0.0).to(tl.float32)
    o += g1[:, None] * tl.load(OS + off, mask=m, other=0.0).to(tl.float32)
    if HAS_WIN:
        g2 = tl.load(GATES + r * 3 + 2, mask=r < R, other=0.0).to(tl.float32)
        o += g2[:, None] * tl.load(OW + off, mask=m, other=0.0).to(tl.float32)
    tl.store(O + off, o.to(O.dtype.element_ty), mask=m)


@triton.jit
def _combine_bwd(DO, OC, OS, OW, GATES, DG, DOC, DOS, DOW, DELTA, R, DV,
                 HAS_WIN: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    rm = r < R
    m = rm[:, None] & (d < DV)[None, :]
    off = r[:, None] * DV + d[None, :]
    do = tl.load(DO + off, mask=m, other=0.0).to(tl.float32)
    for b in tl.static_range(3):
        if b < 2 or HAS_WIN:
            if b == 0:
                ob = tl.load(OC + off, mask=m, other=0.0).to(tl.float32)
                dob_ptr = DOC
            elif b == 1:
                ob = tl.load(OS + off, mask=m, other=0.0).to(tl.float32)
                dob_ptr = DOS
            else:
                ob = tl.load(OW + off, mask=m, other=0.0).to(tl.float32)
                dob_ptr = DOW
            g = tl.load(GATES + r * 3 + b, mask=rm, other=0.0).to(tl.float32)
            dg = tl.sum(do * ob, 1)
            tl.store(DG + r * 3 + b, dg, mask=rm)
            tl.store(DELTA + b * R + r, g * dg, mask=rm)
            tl.store(dob_ptr + off, (g[:, None] * do).to(dob_ptr.dtype.element_ty), mask=m)
        else:
            tl.store(DG + r * 3 + b, tl.zeros([BR], tl.float32), mask=rm)


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


def combine_backward(do, o_c, o_s, o_w, gates, rows: int):
    """Returns dg [T, HQ, 3] fp32, (do_cmp, do_sel, do_win) in do's dtype, delta fp32 [3, T, HQ]."""
    T, HQ, DV = o_c.shape
    R = T * HQ
    dg = torch.empty(T, HQ, 3, dtype=torch.float32, device=do.device)
    dos = [torch.empty_like(o_c, dtype=do.dtype) for _ in range(2 if o_w is None else 3)]
    # every row of delta is written, but the window's only with a window branch
    alloc = torch.empty if o_w is not None else torch.zeros
    delta = alloc(3, T, HQ, dtype=torch.float32, device=do.device)
    if R:
        _combine_bwd[(triton.cdiv(R, rows),)](do, o_c, o_s, o_c if o_w is None else o_w, gates, dg,
                                              dos[0], dos[1], dos[-1], delta, R, DV,
                                              HAS_WIN=o_w is not None, BR=rows,
                                              BD=max(16, triton.next_power_of_2(DV)))
    return dg, dos, delta

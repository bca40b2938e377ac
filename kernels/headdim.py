"""Head dims as up to three power-of-two column pieces (issue 25).

``tl.arange`` takes power-of-two sizes only, so a head dim of 192 ran as 256: a third more
QK / dQ / dK matrix work and accumulator registers, all on zero columns. A dim that is not a
power of two runs as pieces instead: three equal ones where it is three times a power of two
(192 = 3 x 64, 96 = 3 x 32), else a power of two plus a smaller one (160 = 128 + 32, 136 =
128 + 16 with 8 columns masked). Products over the head dim are summed over the pieces
(Q K^T = Q1 K1^T + Q2 K2^T + Q3 K3^T), and where the head dim is the output's (dQ = dS K,
dK = dS^T Q) each piece has its own accumulator. Equal pieces give every accumulator one
layout; 128 + 64 has two (N = 128 and N = 64 products), and Triton 3.6's sm_90a build of the
backward kernels spilled more with two (docs/benchmarks.md, "Head dims in pieces").

The kernels keep their first-piece code (BD columns, as a power of two always was) and pass
the later pieces as a tuple ``(x2, x3)`` through the ``rest_*`` helpers; equal pieces also
come through TMA (``rest_tma``: one descriptor box per piece). A piece of width 0
does not exist: its slot holds the first piece, never read, so at a power of two the kernels
compile to what they did before.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

MODES = ("auto", "two", "one")  # LaunchConfig.head_dim_pieces


@functools.lru_cache(maxsize=None)  # asked at every launch
def split_dim(d: int, mode: str = "auto") -> tuple[int, int, int]:
    """(BD, BD2, BD3): the widths of a head dim's column pieces, powers of two >= 16 (tl.dot's
    least), 0 for no piece. "auto": three equal pieces where d is three times a power of two
    >= 16, else as "two"; "two": a power of two plus a smaller one where narrower than one
    padded piece; "one": one piece, d padded to a power of two.
    192 -> (64, 64, 64) ("two": (128, 64, 0)), 96 -> (32, 32, 32), 160 -> (128, 32, 0),
    136 -> (128, 16, 0); 128 -> (128, 0, 0), 200 -> (256, 0, 0), 48 -> (32, 16, 0)."""
    if d < 1:
        raise ValueError(f"head dim must be positive, got {d}")
    if mode not in MODES:
        raise ValueError(f"head-dim pieces must be one of {MODES}, got {mode!r}")
    whole = max(16, triton.next_power_of_2(d))
    if mode == "one" or whole == d or whole <= 16:
        return whole, 0, 0
    third = d // 3
    if mode == "auto" and d % 3 == 0 and third >= 16 and third & (third - 1) == 0:
        return third, third, third
    rest = max(16, triton.next_power_of_2(d - whole // 2))
    if rest >= whole // 2:
        return whole, 0, 0
    return whole // 2, rest, 0


@triton.jit
def _piece(P, rows, ok, D, OFF: tl.constexpr, W: tl.constexpr, first, TRANS: tl.constexpr):
    """Columns OFF..OFF+W-1 of rows ``rows`` (mask ``ok``) of a row-major [*, D] tensor at P:
    [R, W] ([W, R] with TRANS); ``first`` when W = 0."""
    x = first
    if W > 0:
        c = OFF + tl.arange(0, W)
        if TRANS:
            x = tl.load(P + rows[None, :] * D + c[:, None], mask=ok[None, :] & (c < D)[:, None], other=0.0)
        else:
            x = tl.load(P + rows[:, None] * D + c[None, :], mask=ok[:, None] & (c < D)[None, :], other=0.0)
    return x


@triton.jit
def rest_load(P, rows, ok, D, first, BD: tl.constexpr, BD2: tl.constexpr, BD3: tl.constexpr,
              TRANS: tl.constexpr = False):
    """The later pieces (x2, x3) of rows ``rows`` of a row-major [*, D] tensor whose first piece
    ``first`` ([R, BD], or [BD, R] with TRANS) the caller loaded."""
    return _piece(P, rows, ok, D, BD, BD2, first, TRANS), _piece(P, rows, ok, D, BD + BD2, BD3, first, TRANS)


@triton.jit
def _box(D, row, col, TRANS: tl.constexpr):
    x = D.load([row, col])
    if TRANS:
        x = tl.trans(x)
    return x


@triton.jit
def rest_tma(D, row, col, first, BD: tl.constexpr, BD2: tl.constexpr, BD3: tl.constexpr,
             TRANS: tl.constexpr = False):
    """The later pieces (x2, x3) of a tile whose first piece ``first`` is the box at [row, col]
    of the TMA descriptor D ([*, columns], box width BD): the boxes at columns col + BD and
    col + BD + BD2, transposed with TRANS. The pieces must be equal (``tma.kv_descriptors``
    makes D only then), since a descriptor has one box shape."""
    x2 = first
    x3 = first
    if BD2 > 0:
        x2 = _box(D, row, col + BD, TRANS)
    if BD3 > 0:
        x3 = _box(D, row, col + BD + BD2, TRANS)
    return x2, x3


@triton.jit
def rest_tma_rows(D, p0, hg, first, R: tl.constexpr, BD: tl.constexpr, BD2: tl.constexpr, BD3: tl.constexpr):
    """As ``rest_tma`` for a [positions, heads, columns] descriptor (``tma.row_descriptors``):
    the later pieces of the box at [p0, hg, 0], each reshaped to [R, BD]."""
    x2 = first
    x3 = first
    if BD2 > 0:
        x2 = tl.reshape(D.load([p0, hg, BD]), [R, BD2])
    if BD3 > 0:
        x3 = tl.reshape(D.load([p0, hg, BD + BD2]), [R, BD3])
    return x2, x3


@triton.jit
def rest_dot(acc, a, b, BD2: tl.constexpr, BD3: tl.constexpr, PREC: tl.constexpr, TRANS_B: tl.constexpr = False):
    """acc plus the later pieces' products sum_i a[i] @ b[i] (b[i] transposed with TRANS_B): the
    rest of a product whose inner dim is the head dim."""
    a2, a3 = a
    b2, b3 = b
    if TRANS_B:
        b2, b3 = tl.trans(b2), tl.trans(b3)
    if BD2 > 0:
        acc = tl.dot(a2, b2, acc, input_precision=PREC)
    if BD3 > 0:
        acc = tl.dot(a3, b3, acc, input_precision=PREC)
    return acc


@triton.jit
def rest_zeros(R: tl.constexpr, first, BD2: tl.constexpr, BD3: tl.constexpr):
    """fp32 accumulators of the later pieces, [R, BD2] and [R, BD3]."""
    z2 = first
    z3 = first
    if BD2 > 0:
        z2 = tl.zeros([R, BD2], tl.float32)
    if BD3 > 0:
        z3 = tl.zeros([R, BD3], tl.float32)
    return z2, z3


@triton.jit
def rest_acc(accs, x, b, BD2: tl.constexpr, BD3: tl.constexpr, PREC: tl.constexpr):
    """accs[i] + x @ b[i] for the later pieces: an accumulator whose columns are the head dim."""
    a2, a3 = accs
    b2, b3 = b
    if BD2 > 0:
        a2 += tl.dot(x, b2, input_precision=PREC)
    if BD3 > 0:
        a3 += tl.dot(x, b3, input_precision=PREC)
    return a2, a3


@triton.jit
def rest_scale(xs, f, BD2: tl.constexpr, BD3: tl.constexpr):
    """The later pieces times f (a scalar, or [R, 1])."""
    x2, x3 = xs
    if BD2 > 0:
        x2 = x2 * f
    if BD3 > 0:
        x3 = x3 * f
    return x2, x3


@triton.jit
def rest_amax(amax, xs, BD2: tl.constexpr, BD3: tl.constexpr):
    """Row maxima of |x| [R], over amax (the first piece's) and the later pieces."""
    x2, x3 = xs
    if BD2 > 0:
        amax = tl.maximum(amax, tl.max(tl.abs(x2), 1))
    if BD3 > 0:
        amax = tl.maximum(amax, tl.max(tl.abs(x3), 1))
    return amax


@triton.jit
def _store_piece(P, BASE, rows, ok, D, x, OFF: tl.constexpr, W: tl.constexpr, HOW: tl.constexpr):
    if W > 0:
        c = OFF + tl.arange(0, W)
        off = rows[:, None] * D + c[None, :]
        msk = ok[:, None] & (c < D)[None, :]
        if HOW == 1:
            tl.atomic_add(P + off, x, mask=msk, sem="relaxed")
        elif HOW == 2:
            tl.store(P + off, (tl.load(BASE + off, mask=msk, other=0.0) + x).to(P.dtype.element_ty), mask=msk)
        else:
            tl.store(P + off, x.to(P.dtype.element_ty), mask=msk)


@triton.jit
def rest_store(P, rows, ok, D, xs, BD: tl.constexpr, BD2: tl.constexpr, BD3: tl.constexpr,
               ATOMIC: tl.constexpr = False, BASE=None):
    """Store the later pieces xs of rows ``rows`` (mask ``ok``) of a row-major [*, D] tensor at P,
    cast to P's dtype; ATOMIC: add them (fp32, relaxed); BASE (a tensor like P): store BASE's
    values plus them."""
    how: tl.constexpr = 1 if ATOMIC else (0 if BASE is None else 2)
    x2, x3 = xs
    _store_piece(P, BASE, rows, ok, D, x2, BD, BD2, how)
    _store_piece(P, BASE, rows, ok, D, x3, BD + BD2, BD3, how)

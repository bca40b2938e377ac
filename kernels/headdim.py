"""Head dims as one or two power-of-two column pieces (issue 25).

``tl.arange`` takes power-of-two sizes only, so a head dim of 192 ran as 256: a third more
QK / dQ / dK matrix work and accumulator registers, all on zero columns. A dim that is a
power of two plus a smaller one (192 = 128 + 64, 96 = 64 + 32, 160 = 128 + 32, ...) runs as
two pieces instead: tiles of the first BD columns and of the next BD2, products over the
head dim summed (Q K^T = Q1 K1^T + Q2 K2^T), and one accumulator per piece where the head dim
is the output's (dQ = dS K, dK = dS^T Q). BD2 = 0 is the one-piece (padded) path, which then
compiles to what it did before: every second-piece value is the first piece itself, never
read, so the compiler drops it.
"""
from __future__ import annotations

import triton
import triton.language as tl


def split_dim(d: int) -> tuple[int, int]:
    """(BD, BD2): the widths of a head dim's two column pieces, powers of two >= 16 (tl.dot's
    least), BD2 = 0 for one piece. Two pieces when they are narrower than one padded piece:
    192 -> (128, 64), 96 -> (64, 32), 136 -> (128, 16); 128 -> (128, 0), 200 -> (256, 0)."""
    if d < 1:
        raise ValueError(f"head dim must be positive, got {d}")
    whole = max(16, triton.next_power_of_2(d))
    rest = max(16, triton.next_power_of_2(d - whole // 2))
    if whole == d or whole <= 16 or rest >= whole // 2:
        return whole, 0
    return whole // 2, rest


@triton.jit
def piece2(P, rows, ok, D, BD: tl.constexpr, BD2: tl.constexpr, first, TRANS: tl.constexpr = False):
    """The second piece of rows ``rows`` (mask ``ok``) of a row-major [*, D] tensor at P: its
    columns BD..BD+BD2-1 as [R, BD2] ([BD2, R] with TRANS, as the first piece was loaded);
    ``first`` (the first piece, never read) when BD2 = 0."""
    x = first
    if BD2 > 0:
        c = BD + tl.arange(0, BD2)
        if TRANS:
            x = tl.load(P + rows[None, :] * D + c[:, None], mask=ok[None, :] & (c < D)[:, None], other=0.0)
        else:
            x = tl.load(P + rows[:, None] * D + c[None, :], mask=ok[:, None] & (c < D)[None, :], other=0.0)
    return x


@triton.jit
def dot2(a, b, a2, b2, BD2: tl.constexpr, PREC: tl.constexpr):
    """a @ b, plus a2 @ b2 when BD2 > 0: a product whose inner dim is a head dim in pieces."""
    x = tl.dot(a, b, input_precision=PREC)
    if BD2 > 0:
        x = tl.dot(a2, b2, x, input_precision=PREC)
    return x


@triton.jit
def zeros2(R: tl.constexpr, BD2: tl.constexpr, first):
    """The second piece's fp32 accumulator [R, BD2] (``first`` when BD2 = 0)."""
    x = first
    if BD2 > 0:
        x = tl.zeros([R, BD2], tl.float32)
    return x


@triton.jit
def store2(P, rows, ok, D, x2, BD: tl.constexpr, BD2: tl.constexpr, ATOMIC: tl.constexpr = False):
    """Store (ATOMIC: add, relaxed) the second piece x2 [R, BD2] of rows ``rows`` (mask ``ok``)
    of a row-major [*, D] tensor at P; nothing when BD2 = 0. x2 is cast to P's dtype."""
    if BD2 > 0:
        c = BD + tl.arange(0, BD2)
        msk = ok[:, None] & (c < D)[None, :]
        if ATOMIC:
            tl.atomic_add(P + rows[:, None] * D + c[None, :], x2, mask=msk, sem="relaxed")
        else:
            tl.store(P + rows[:, None] * D + c[None, :], x2.to(P.dtype.element_ty), mask=msk)

"""Rotary position embedding in one kernel per direction (reference: nsa_dist/modules/rope.py).

PyTorch's rotate-half RoPE, ``x * cos + cat(-x2, x1) * sin``, runs five kernels forward
(negate, concatenate, two broadcast products, a sum) and more backward, each a pass over x
(``python -m nsa_dist.training.step_profile`` shows their share). Here one program rotates
the heads of one (batch, position) row: y1 = x1 c - x2 s, y2 = x2 c + x1 s, in fp32, written
in x's dtype. The backward is the rotation by -theta.
x may be a strided view as long as its last dimension is contiguous; the result is a new
contiguous tensor. ``rope_split`` takes a fused projection's whole output and writes each of
its column groups (q and the keys rotated, the values copied, the gate's first layer through
its bias and SiLU) to its own contiguous tensor in one launch; its backward writes the
projection's gradient whole in one more (no split views to copy, no concatenation).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from nsa_dist.modules.rope import check_chunks
from nsa_dist.ops.blocks import to_device

from .phi import silu, silu_grad


@triton.jit
def _rope_rows(X, Y, COS, SIN, S, H, sx_b, sx_s, sx_h, sy_b, sy_s, sy_h, cos_b, SIGN: tl.constexpr,
               HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (batch, position) row, BLOCK_H heads: Y = rotate(X) by SIGN * theta."""
    i_row, i_h = tl.program_id(0), tl.program_id(1)
    i_b, i_s = i_row // S, i_row % S
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HALF
    m = (o_h < H)[:, None] & m_d[None, :]
    p_cs = (i_b * cos_b + i_s) * HALF + o_d
    b_c = tl.load(COS + p_cs, mask=m_d, other=0.0)[None, :]
    b_s = tl.load(SIN + p_cs, mask=m_d, other=0.0)[None, :] * SIGN
    p_x = X + i_b * sx_b + i_s * sx_s + o_h[:, None] * sx_h + o_d[None, :]
    b_x1 = tl.load(p_x, mask=m, other=0.0).to(tl.float32)
    b_x2 = tl.load(p_x + HALF, mask=m, other=0.0).to(tl.float32)
    p_y = Y + i_b * sy_b + i_s * sy_s + o_h[:, None] * sy_h + o_d[None, :]
    tl.store(p_y, (b_x1 * b_c - b_x2 * b_s).to(Y.dtype.element_ty), mask=m)
    tl.store(p_y + HALF, (b_x2 * b_c + b_x1 * b_s).to(Y.dtype.element_ty), mask=m)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float,
            out: torch.Tensor = None) -> torch.Tensor:
    """x rotated into ``out`` (any [B, S, H, D] view with a contiguous last dim; default a
    new contiguous tensor)."""
    B, S, H, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((B, S, H, D), device=x.device, dtype=x.dtype) if out is None else out
    if y.numel() == 0:
        return y
    block_h = min(triton.next_power_of_2(H), max(1, 4096 // D))
    grid = (B * S, triton.cdiv(H, block_h))
    _rope_rows[grid](x, y, cos, sin, S, H, x.stride(0), x.stride(1), x.stride(2),
                     y.stride(0), y.stride(1), y.stride(2),
                     S if cos.shape[0] > 1 else 0, SIGN=sign, HALF=D // 2, BLOCK_H=block_h,
                     BLOCK_D=triton.next_power_of_2(D // 2))
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, -1.0), None, None


KINDS = ("copy", "rope", "silu")  # what ``rope_split`` does to a column group
TABLE_COLS = tl.constexpr(7)  # columns of ``_split_cols``' item table


@triton.jit
def _split_cols(Y, TABLE, COS, SIN, BIAS, PRE, DPRE, R, S, sy, cos_b, SIGN: tl.constexpr,
                BACKWARD: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                ALIGN: tl.constexpr, PTR_ALIGNED: tl.constexpr, PRECISE: tl.constexpr):
    """BLOCK_R rows (of R = B*S, row stride sy in Y) of one work item, 2*HALF columns of one
    column group: moved from Y to the group's own contiguous [R, width] tensor (BACKWARD: back).
    TABLE row per item: (first column in Y, first column in the group, the group's width, kind,
    the group tensor's address, its chunk CH, its unit U), so one launch serves every group. A
    group is stored [R, width] (CH = 1, U = width) or, chunked, [R / CH, width / U, CH, U]: CH
    rows of each unit (head) of U columns together, an item then being one unit (phi's input
    chunks, ``rope_split``'s ``chunks``). Kinds (``KINDS``): 0 copied;
    1 rotated by SIGN * theta (an item is one head); 2 (one group) h = silu(y + BIAS), each op
    rounded to Y's dtype as PyTorch's, with y + BIAS kept in PRE for the backward, which writes
    the gradient of y + BIAS to Y and to DPRE. Widths and columns are multiples of ALIGN and the
    addresses 16-byte aligned (PTR_ALIGNED), so the compiler moves 16 bytes per access."""
    i_r, item = tl.program_id(0), tl.program_id(1)
    col_y = tl.multiple_of(tl.load(TABLE + item * TABLE_COLS), ALIGN)
    col_p = tl.multiple_of(tl.load(TABLE + item * TABLE_COLS + 1), ALIGN)
    width = tl.multiple_of(tl.load(TABLE + item * TABLE_COLS + 2), ALIGN)
    kind = tl.load(TABLE + item * TABLE_COLS + 3)
    part = tl.load(TABLE + item * TABLE_COLS + 4).to(tl.pointer_type(Y.dtype.element_ty))
    ch = tl.load(TABLE + item * TABLE_COLS + 5)
    unit = tl.multiple_of(tl.load(TABLE + item * TABLE_COLS + 6), ALIGN)
    if PTR_ALIGNED:
        part = tl.multiple_of(part, 16)
    r = (i_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    row_ok = (r < R)[:, None]
    m1 = row_ok & ((o_d < HALF) & (col_p + o_d < width))[None, :]  # a copied group's last item may be partial
    m2 = row_ok & ((o_d < HALF) & (col_p + HALF + o_d < width))[None, :]
    p_y = Y + r[:, None] * sy + col_y + o_d[None, :]
    # in the group's tensor: row r's chunk, the item's unit, r's row in the chunk, the column
    # (plain groups: ch = 1, unit = width, so r * width + col_p)
    u = col_p // unit
    off = ((r // ch) * (width * ch) + (r % ch) * unit)[:, None] + (u * (ch * unit) + col_p - u * unit) + o_d[None, :]
    p_p = part + off
    if BACKWARD:
        p_src, p_dst = p_p, p_y
    else:
        p_src, p_dst = p_y, p_p
    b_x1 = tl.load(p_src, mask=m1, other=0.0).to(tl.float32)
    b_x2 = tl.load(p_src + HALF, mask=m2, other=0.0).to(tl.float32)
    if kind == 1:
        p_cs = ((r // S) * cos_b + r % S)[:, None] * HALF + o_d[None, :]
        m_cs = row_ok & (o_d < HALF)[None, :]
        b_c = tl.load(COS + p_cs, mask=m_cs, other=0.0)
        b_s = tl.load(SIN + p_cs, mask=m_cs, other=0.0) * SIGN
        b_y1 = b_x1 * b_c - b_x2 * b_s
        b_y2 = b_x2 * b_c + b_x1 * b_s
    elif kind == 2:
        p_pre = PRE + off
        c = col_p + o_d[None, :]
        if BACKWARD:  # x: the gradient of h
            p1 = tl.load(p_pre, mask=m1, other=0.0).to(tl.float32)
            p2 = tl.load(p_pre + HALF, mask=m2, other=0.0).to(tl.float32)
            b_y1 = silu_grad(b_x1, p1, PRECISE).to(Y.dtype.element_ty).to(tl.float32)
            b_y2 = silu_grad(b_x2, p2, PRECISE).to(Y.dtype.element_ty).to(tl.float32)
            p_dpre = DPRE + off
            tl.store(p_dpre, b_y1.to(Y.dtype.element_ty), mask=m1)
            tl.store(p_dpre + HALF, b_y2.to(Y.dtype.element_ty), mask=m2)
        else:
            p1 = (b_x1 + tl.load(BIAS + c, mask=m1, other=0.0).to(tl.float32)).to(Y.dtype.element_ty)
            p2 = (b_x2 + tl.load(BIAS + c + HALF, mask=m2, other=0.0).to(tl.float32)).to(Y.dtype.element_ty)
            tl.store(p_pre, p1, mask=m1)
            tl.store(p_pre + HALF, p2, mask=m2)
            b_y1 = silu(p1.to(tl.float32), PRECISE)
            b_y2 = silu(p2.to(tl.float32), PRECISE)
    else:
        b_y1, b_y2 = b_x1, b_x2
    tl.store(p_dst, b_y1.to(Y.dtype.element_ty), mask=m1)
    tl.store(p_dst + HALF, b_y2.to(Y.dtype.element_ty), mask=m2)


SPLIT_ROWS = 32  # rows per ``_split_cols`` program: 2 x 8 KB moved per program at head_dim 128, bf16


def _move_groups(y: torch.Tensor, parts: list, widths: tuple, kinds: tuple, cos, sin, head_dim: int,
                 backward: bool, silu_tensors: tuple = (), chunks: tuple = ()) -> None:
    """One ``_split_cols`` launch: y [B, S, N] (contiguous) to the contiguous group tensors
    ``parts`` (backward: the other way, rotation by -theta). silu_tensors: (bias, pre)
    forward, (pre, dpre) backward, for the "silu" group. chunks: each group's chunk of
    positions (``rope_split``; 1 or empty: plain). Work items are head_dim columns of one
    group (a rotated group's heads), so every program moves whole rows of its item."""
    B, S, N = y.shape
    if B * S == 0:
        return
    chunks = chunks or (1,) * len(widths)
    starts = [sum(widths[:i]) for i in range(len(widths))]
    items = [[c0 + c, c, w, KINDS.index(k), p.data_ptr(), ch, w if ch == 1 else head_dim]
             for c0, w, k, p, ch in zip(starts, widths, kinds, parts, chunks) for c in range(0, w, head_dim)]
    table = to_device(torch.tensor(items, dtype=torch.int64), y.device)
    align = math.gcd(16, head_dim, *widths)  # a power of two dividing every column and width
    a, b = silu_tensors or (y, y)
    bias, pre, dpre = (y, a, b) if backward else (a, b, y)
    # the table's addresses only: y, bias and pre are arguments, which the launcher specialises itself
    ptr_aligned = all(p.data_ptr() % 16 == 0 for p in parts)
    grid = (triton.cdiv(B * S, SPLIT_ROWS), len(items))
    _split_cols[grid](y, table, cos, sin, bias, pre, dpre, B * S, S, y.stride(1), S if cos.shape[0] > 1 else 0,
                      SIGN=-1.0 if backward else 1.0, BACKWARD=backward, HALF=head_dim // 2, BLOCK_R=SPLIT_ROWS,
                      BLOCK_D=triton.next_power_of_2(head_dim // 2), ALIGN=align, PTR_ALIGNED=ptr_aligned,
                      PRECISE=y.is_cuda)


def _group_shape(B: int, S: int, width: int, chunk: int, head_dim: int) -> tuple:
    """A group tensor's shape: [B, S, width], or chunked [B, S / chunk, width / head_dim,
    chunk, head_dim] (``rope_split``'s ``chunks``)."""
    return (B, S, width) if chunk == 1 else (B, S // chunk, width // head_dim, chunk, head_dim)


class _RopeSplit(torch.autograd.Function):
    """y's column groups as separate contiguous tensors (``rope_split``); the backward writes
    every group's gradient into one dy. One kernel launch each way."""

    @staticmethod
    def forward(ctx, y, cos, sin, bias, widths, kinds, head_dim, chunks):
        ctx.widths, ctx.kinds, ctx.head_dim, ctx.chunks = widths, kinds, head_dim, chunks
        B, S, _ = y.shape
        ctx.B, ctx.S = B, S
        parts = [torch.empty(_group_shape(B, S, w, c, head_dim), dtype=y.dtype, device=y.device)
                 for w, c in zip(widths, chunks)]
        pre = None
        if "silu" in kinds:
            pre = torch.empty_like(parts[kinds.index("silu")])
        _move_groups(y, parts, widths, kinds, cos, sin, head_dim, False, () if pre is None else (bias, pre), chunks)
        ctx.save_for_backward(cos, sin, pre)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *dys):
        cos, sin, pre = ctx.saved_tensors
        first = next(d for d in dys if d is not None)
        B, S = ctx.B, ctx.S
        dys = [torch.zeros(_group_shape(B, S, w, c, ctx.head_dim), dtype=first.dtype, device=first.device)
               if d is None else d.contiguous() for d, w, c in zip(dys, ctx.widths, ctx.chunks)]
        dy = torch.empty(B, S, sum(ctx.widths), dtype=first.dtype, device=first.device)
        dpre = None if pre is None else torch.empty_like(pre)
        _move_groups(dy, dys, ctx.widths, ctx.kinds, cos, sin, ctx.head_dim, True, () if pre is None else (pre, dpre),
                     ctx.chunks)
        # the bias gradient as autograd reduces a broadcast add's (the same call on the same tensor)
        dbias = None if dpre is None else dpre.sum_to_size(dpre.shape[-1:])
        return dy, None, None, dbias, None, None, None, None


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rope_rotate: x must be [B, S, H, D] with D even, got {tuple(x.shape)}")
    want = (x.shape[1], x.shape[-1] // 2)
    if cos.shape != sin.shape or cos.dim() != 3 or tuple(cos.shape[1:]) != want \
            or cos.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"rope_rotate: cos/sin must be [1 or {x.shape[0]}, {want[0]}, {want[1]}], got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise TypeError(f"rope_rotate: cos/sin must be float32, got {cos.dtype} / {sin.dtype}")


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x [B, S, H, D] (last dim contiguous, D even), cos/sin [1 or B, S, D/2]
    float32 (the angles of each position) -> [B, S, H, D] in x's dtype. Differentiable in x."""
    _check(x, cos, sin)
    return _Rope.apply(x, cos.contiguous(), sin.contiguous())


def rope_rotate_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sizes: list) -> tuple:
    """``rope_rotate`` of x [B, S, H, D] returned as contiguous [B, S, h_i, D] tensors, one per
    group of ``sizes`` (sum H) heads: what ``rope_rotate(x).split(sizes, 2)`` holds, without
    the strided views that a later ``.contiguous()`` would copy. Differentiable in x."""
    _check(x, cos, sin)
    if sum(sizes) != x.shape[2]:
        raise ValueError(f"rope_rotate_split: sizes {list(sizes)} must sum to x's {x.shape[2]} heads")
    D = x.shape[-1]
    parts = rope_split(x.flatten(2), cos, sin, [h * D for h in sizes], ["rope"] * len(sizes), D)
    return tuple(p.unflatten(-1, (h, D)) for p, h in zip(parts, sizes))


def rope_split(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, widths: list, kinds: list,
               head_dim: int, bias: torch.Tensor = None, chunks: Optional[list] = None) -> tuple:
    """y [B, S, N] (last dim contiguous; e.g. a fused projection's output) as one contiguous
    [B, S, w_i] tensor per group of ``widths`` (sum N) columns, by ``kinds[i]``: "copy";
    "rope", heads of ``head_dim`` rotated (cos/sin [1 or B, S, head_dim/2] float32); "silu"
    (one group at most), silu(y + bias) with bias [w_i] in y's dtype, rounded after each op as
    PyTorch's (a gate's first layer). One kernel launch forward and one backward (which fills
    dy whole: no concatenation of the groups' gradients). Differentiable in y and bias.
    chunks: per group, c > 1 returns it as [B, S / c, w_i / head_dim, c, head_dim]: each head's
    c consecutive positions together, what phi's chunks are (``MLPCompressor.from_chunks``), so
    no transposing copy follows ("copy" or "rope" groups of whole heads, S a multiple of c)."""
    if y.dim() != 3 or head_dim % 2:
        raise ValueError(f"rope_split: y must be [B, S, N] and head_dim even, got {tuple(y.shape)}, {head_dim}")
    _check(y[:, :, :head_dim].unflatten(-1, (1, head_dim)), cos, sin)
    if sum(widths) != y.shape[-1] or len(kinds) != len(widths) or any(k not in KINDS for k in kinds):
        raise ValueError(f"rope_split: widths {list(widths)} must sum to y's {y.shape[-1]} columns, one kind "
                         f"of {KINDS} each (got {list(kinds)})")
    if any(k == "rope" and w % head_dim for w, k in zip(widths, kinds)):
        raise ValueError(f"rope_split: rotated groups must be whole heads of {head_dim}, got widths {list(widths)}")
    silu_groups = [w for w, k in zip(widths, kinds) if k == "silu"]
    if len(silu_groups) > 1 or (silu_groups and (bias is None or tuple(bias.shape) != (silu_groups[0],)
                                                 or bias.dtype != y.dtype)):
        raise ValueError(f"rope_split: one \"silu\" group at most, with a bias of its width in y's dtype; got "
                         f"kinds {list(kinds)}, bias {None if bias is None else (tuple(bias.shape), bias.dtype)}")
    chunks = tuple(check_chunks("rope_split", chunks, widths, kinds, head_dim, y.shape[1]))
    y = y.contiguous()  # rows of one stride (a fused projection's output already is)
    return _RopeSplit.apply(y, cos.contiguous(), sin.contiguous(), None if bias is None else bias.contiguous(),
                            tuple(widths), tuple(kinds), head_dim, chunks)

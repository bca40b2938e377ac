"""Rotary position embedding in one kernel per direction (reference: nsa_dist/modules/rope.py).

PyTorch's rotate-half RoPE, ``x * cos + cat(-x2, x1) * sin``, runs five kernels forward
(negate, concatenate, two broadcast products, a sum) and more backward, each a pass over x
(``python -m nsa_dist.training.step_profile`` shows their share). Here one program rotates
the heads of one (batch, position) row: y1 = x1 c - x2 s, y2 = x2 c + x1 s, in fp32, written
in x's dtype. The backward is the rotation by -theta.
x may be a strided view (e.g. the q and k heads of one fused projection's output) as long as
its last dimension is contiguous; the result is a new contiguous tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_dist.ops.blocks import to_device


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


@triton.jit
def _split_cols(Y, TABLE, COS, SIN, S, sy_b, sy_s, cos_b, SIGN: tl.constexpr, BACKWARD: tl.constexpr,
                D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (batch, position) row of one column group, BLOCK_H heads of D columns: the group's
    columns of Y moved to (BACKWARD: from) its own contiguous tensor, rotated by SIGN * theta
    where the group is rotated. TABLE row g: (first column in Y, width, rotated, address of the
    group's [B*S, width] tensor), so one launch serves every group."""
    i_row, g, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_s = i_row // S, i_row % S
    col0 = tl.load(TABLE + g * 4)
    width = tl.load(TABLE + g * 4 + 1)
    rot = tl.load(TABLE + g * 4 + 2)
    part = tl.load(TABLE + g * 4 + 3).to(tl.pointer_type(Y.dtype.element_ty))
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HALF
    c1 = o_h[:, None] * D + o_d[None, :]  # first halves of the heads; a copied group's last may be partial
    m1 = m_d[None, :] & (c1 < width)
    m2 = m_d[None, :] & (c1 + HALF < width)
    p_y = Y + i_b * sy_b + i_s * sy_s + col0 + c1
    p_p = part + i_row.to(tl.int64) * width + c1
    if BACKWARD:
        p_src, p_dst = p_p, p_y
    else:
        p_src, p_dst = p_y, p_p
    b_x1 = tl.load(p_src, mask=m1, other=0.0).to(tl.float32)
    b_x2 = tl.load(p_src + HALF, mask=m2, other=0.0).to(tl.float32)
    if rot != 0:
        p_cs = (i_b * cos_b + i_s) * HALF + o_d
        b_c = tl.load(COS + p_cs, mask=m_d, other=0.0)[None, :]
        b_s = tl.load(SIN + p_cs, mask=m_d, other=0.0)[None, :] * SIGN
        b_y1 = b_x1 * b_c - b_x2 * b_s
        b_y2 = b_x2 * b_c + b_x1 * b_s
    else:
        b_y1, b_y2 = b_x1, b_x2
    tl.store(p_dst, b_y1.to(Y.dtype.element_ty), mask=m1)
    tl.store(p_dst + HALF, b_y2.to(Y.dtype.element_ty), mask=m2)


def _move_groups(y: torch.Tensor, parts: list, widths: tuple, rotated: tuple, cos, sin, head_dim: int,
                 backward: bool) -> None:
    """One ``_split_cols`` launch: y [B, S, N] (last dim contiguous) to the contiguous group
    tensors ``parts`` (backward: the other way, rotation by -theta)."""
    B, S, _ = y.shape
    if B * S == 0:
        return
    starts = [sum(widths[:i]) for i in range(len(widths))]
    table = torch.tensor([[c, w, int(r), p.data_ptr()] for c, w, r, p in zip(starts, widths, rotated, parts)],
                         dtype=torch.int64)
    table = to_device(table, y.device)
    heads = max(-(-w // head_dim) for w in widths)
    block_h = min(triton.next_power_of_2(heads), max(1, 4096 // head_dim))
    grid = (B * S, len(widths), triton.cdiv(heads, block_h))
    _split_cols[grid](y, table, cos, sin, S, y.stride(0), y.stride(1), S if cos.shape[0] > 1 else 0,
                      SIGN=-1.0 if backward else 1.0, BACKWARD=backward, D=head_dim, HALF=head_dim // 2,
                      BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(head_dim // 2))


class _RopeSplit(torch.autograd.Function):
    """y's column groups as separate contiguous tensors, the rotated ones by RoPE; the backward
    writes every group's gradient (rotated back) into one dy. One kernel launch each way."""

    @staticmethod
    def forward(ctx, y, cos, sin, widths, rotated, head_dim):
        ctx.save_for_backward(cos, sin)
        ctx.widths, ctx.rotated, ctx.head_dim = widths, rotated, head_dim
        B, S, _ = y.shape
        parts = [torch.empty(B, S, w, dtype=y.dtype, device=y.device) for w in widths]
        _move_groups(y, parts, widths, rotated, cos, sin, head_dim, backward=False)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *dys):
        cos, sin = ctx.saved_tensors
        first = next(d for d in dys if d is not None)
        B, S, _ = first.shape
        dys = [torch.zeros(B, S, w, dtype=first.dtype, device=first.device) if d is None else d.contiguous()
               for d, w in zip(dys, ctx.widths)]
        dy = torch.empty(B, S, sum(ctx.widths), dtype=first.dtype, device=first.device)
        _move_groups(dy, dys, ctx.widths, ctx.rotated, cos, sin, ctx.head_dim, backward=True)
        return dy, None, None, None, None, None


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
    parts = rope_split(x.flatten(2), cos, sin, [h * D for h in sizes], [True] * len(sizes), D)
    return tuple(p.unflatten(-1, (h, D)) for p, h in zip(parts, sizes))


def rope_split(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, widths: list, rotated: list,
               head_dim: int) -> tuple:
    """y [B, S, N] (last dim contiguous; e.g. a fused projection's output) as one contiguous
    [B, S, w_i] tensor per group of ``widths`` (sum N) columns; a group with ``rotated[i]`` is
    heads of ``head_dim`` rotated by RoPE (cos/sin [1 or B, S, head_dim/2] float32), the others
    are copied. One kernel launch forward and one backward (which fills dy whole: no
    concatenation of the groups' gradients). Differentiable in y."""
    if y.dim() != 3 or head_dim % 2:
        raise ValueError(f"rope_split: y must be [B, S, N] and head_dim even, got {tuple(y.shape)}, {head_dim}")
    _check(y[:, :, :head_dim].unflatten(-1, (1, head_dim)), cos, sin)
    if sum(widths) != y.shape[-1] or len(rotated) != len(widths):
        raise ValueError(f"rope_split: widths {list(widths)} must sum to y's {y.shape[-1]} columns, one "
                         f"rotated flag each (got {len(rotated)})")
    if any(r and w % head_dim for w, r in zip(widths, rotated)):
        raise ValueError(f"rope_split: rotated groups must be whole heads of {head_dim}, got widths {list(widths)}")
    if y.stride(-1) != 1:
        y = y.contiguous()
    return _RopeSplit.apply(y, cos.contiguous(), sin.contiguous(), tuple(widths), tuple(bool(r) for r in rotated),
                            head_dim)

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


class _RopeSplit(torch.autograd.Function):
    """Rotation of x's heads into separate contiguous tensors, one per group of heads; the
    backward writes each group's rotated gradient into its heads of one dx."""

    @staticmethod
    def forward(ctx, x, cos, sin, sizes):
        ctx.save_for_backward(cos, sin)
        ctx.sizes = sizes
        return tuple(_rotate(part, cos, sin, 1.0) for part in x.split(sizes, dim=2))

    @staticmethod
    def backward(ctx, *dys):
        cos, sin = ctx.saved_tensors
        first = next(d for d in dys if d is not None)
        B, S, _, D = first.shape
        dx = torch.empty(B, S, sum(ctx.sizes), D, dtype=first.dtype, device=first.device)
        for dy, part in zip(dys, dx.split(ctx.sizes, dim=2)):
            if dy is None:
                part.zero_()
            else:
                _rotate(dy, cos, sin, -1.0, out=part)
        return dx, None, None, None


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
    return _RopeSplit.apply(x, cos.contiguous(), sin.contiguous(), tuple(sizes))

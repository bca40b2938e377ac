"""The elementwise tails of phi over a sequence (``MLPCompressor.sequence``), one kernel per
direction each (reference: the PyTorch lines of nsa_dist/modules/compression.py).

phi's first layer is one GEMM over chunks of d positions, y [B, Nc+m-1, H, hidden, m] (part j:
the layer's columns for the j-th chunk of a block); its pre-activation of block i is
sum_j y[:, i+j, ..., j] + bias, in fp32. In PyTorch that is a cast, m adds, a SiLU and a cast
forward, and twice as many passes backward (casts, padded slices, a stack); the mean of the
block is the chunk sums' shifted sum over l, cast, plus the MLP's output. Each tail here is
one pass over its tensors, computing what the PyTorch ops compute in the same order, in fp32
with the same roundings (SiLU as x / (1 + exp(-x)), division by l as the product with 1/l).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

ROWS = 4  # (batch, block, head) rows per program


@triton.jit
def _pre_rows(Y, B1, B2, i, b, h, NCP, H, HID, o_u, m_u, M: tl.constexpr):
    """fp32 pre-activation of block i for (batch b, head h), columns o_u: sum_j y[b, i+j, h, u, j]
    + (b1 + b2) (the bias's two terms, each exact in fp32)."""
    base = Y + ((b * NCP + i) * H + h).to(tl.int64)[:, None] * (HID * M) + o_u[None, :] * M
    pre = tl.load(base, mask=m_u, other=0.0).to(tl.float32)
    for j in tl.static_range(1, M):
        pre += tl.load(base + j * (H * HID * M) + j, mask=m_u, other=0.0).to(tl.float32)
    bias = tl.load(B1 + o_u, mask=o_u < HID, other=0.0).to(tl.float32) \
        + tl.load(B2 + o_u, mask=o_u < HID, other=0.0).to(tl.float32)
    return pre + bias[None, :]


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    """exp(x) in fp32 as CUDA's expf (PyTorch's) computes it; PRECISE off: tl.exp (the
    interpreter, which has no libdevice)."""
    if PRECISE:
        return libdevice.exp(x)
    return tl.exp(x)


@triton.jit
def silu(x, PRECISE: tl.constexpr):
    """PyTorch's SiLU of fp32 x: x / (1 + exp(-x))."""
    return tl.div_rn(x, 1.0 + _exp(-x, PRECISE))


@triton.jit
def silu_grad(dout, x, PRECISE: tl.constexpr):
    """PyTorch's SiLU backward in fp32: dout * s * (1 + x * (1 - s)), s = 1 / (1 + exp(-x))
    (the last product-sum contracted, as nvcc compiles it)."""
    sig = tl.div_rn(1.0, 1.0 + _exp(-x, PRECISE))
    return dout * sig * tl.fma(x, 1.0 - sig, 1.0)


@triton.jit
def _phi_hidden_fwd(Y, B1, B2, OUT, R, NC, NCP, H, HID, M: tl.constexpr, ROWS: tl.constexpr, BLOCK_U: tl.constexpr,
                    PRECISE: tl.constexpr):
    """OUT [B, NC, H, HID] = silu(pre) in OUT's dtype; rows (b, i, h) of blocks i < NC."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    o_u = tl.program_id(1) * BLOCK_U + tl.arange(0, BLOCK_U)
    m_u = (r < R)[:, None] & (o_u < HID)[None, :]
    b, i, h = r // (NC * H), r // H % NC, r % H
    pre = _pre_rows(Y, B1, B2, i, b, h, NCP, H, HID, o_u, m_u, M)
    out = silu(pre, PRECISE)
    tl.store(OUT + r.to(tl.int64)[:, None] * HID + o_u[None, :], out.to(OUT.dtype.element_ty), mask=m_u)


@triton.jit
def _phi_hidden_bwd(Y, B1, B2, DOUT, DY, DPRE, R, NC, NCP, H, HID, M: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK_U: tl.constexpr, PRECISE: tl.constexpr):
    """Rows (b, c, h) of y, c < NCP: DY[b, c, h, u, j] = dpre of block c - j (0 where there is
    none) in DY's dtype; DPRE [B, NC, H, HID] fp32 (SiLU's backward of the fp32 pre-activation)
    written once, from part j = 0."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    o_u = tl.program_id(1) * BLOCK_U + tl.arange(0, BLOCK_U)
    m_r = r < R
    b, c, h = r // (NCP * H), r // H % NCP, r % H
    p_dy = DY + r.to(tl.int64)[:, None] * (HID * M) + o_u[None, :] * M
    for j in tl.static_range(M):
        i = c - j
        ok = m_r & (i >= 0) & (i < NC)
        m_i = ok[:, None] & (o_u < HID)[None, :]
        pre = _pre_rows(Y, B1, B2, i, b, h, NCP, H, HID, o_u, m_i, M)
        row = ((b * NC + i) * H + h).to(tl.int64)[:, None] * HID + o_u[None, :]
        dout = tl.load(DOUT + row, mask=m_i, other=0.0).to(tl.float32)
        dpre = silu_grad(dout, pre, PRECISE)
        dpre = tl.where(m_i, dpre, 0.0)
        tl.store(p_dy + j, dpre.to(DY.dtype.element_ty), mask=m_r[:, None] & (o_u < HID)[None, :])
        if j == 0:
            tl.store(DPRE + row, dpre, mask=m_i)


@triton.jit
def _phi_mean_fwd(SUMS, F, OUT, R, NC, NCP, H, D, inv_l, M: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """OUT [B, NC, H, D] = (mean rounded to OUT's dtype) + F, mean = (sum_j SUMS[b, i+j, h]) * inv_l."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = (r < R)[:, None] & (o_d < D)[None, :]
    b, i, h = r // (NC * H), r // H % NC, r % H
    base = SUMS + ((b * NCP + i) * H + h).to(tl.int64)[:, None] * D + o_d[None, :]
    s = tl.load(base, mask=m, other=0.0)
    for j in tl.static_range(1, M):
        s += tl.load(base + j * (H * D), mask=m, other=0.0)
    mean = (s * inv_l).to(OUT.dtype.element_ty).to(tl.float32)
    p = r.to(tl.int64)[:, None] * D + o_d[None, :]
    f = tl.load(F + p, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + p, (mean + f).to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _phi_mean_bwd(DOUT, DSUMS, R, NC, NCP, H, D, inv_l, M: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """DSUMS [B, NCP, H, D] fp32: row c sums dout(block c - j) * inv_l over the blocks that hold it."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_r = r < R
    b, c, h = r // (NCP * H), r // H % NCP, r % H
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(M):
        i = c - j
        m = (m_r & (i >= 0) & (i < NC))[:, None] & (o_d < D)[None, :]
        row = ((b * NC + i) * H + h).to(tl.int64)[:, None] * D + o_d[None, :]
        acc += tl.load(DOUT + row, mask=m, other=0.0).to(tl.float32) * inv_l
    tl.store(DSUMS + r.to(tl.int64)[:, None] * D + o_d[None, :], acc, mask=m_r[:, None] & (o_d < D)[None, :])


def _block(n: int) -> int:
    return min(triton.next_power_of_2(n), 1024)


def _warps(block: int) -> int:
    """Warps for ROWS x block tiles: about 16 fp32 values of each a thread."""
    return max(1, min(8, ROWS * block // 512))


class _Hidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, b1, b2, nc, dtype):
        B, NCP, H, HID, M = y.shape
        out = torch.empty(B, nc, H, HID, dtype=dtype, device=y.device)
        R = B * nc * H
        if R:
            bu = _block(HID)
            grid = (triton.cdiv(R, ROWS), triton.cdiv(HID, bu))
            _phi_hidden_fwd[grid](y, b1, b2, out, R, nc, NCP, H, HID, M=M, ROWS=ROWS, BLOCK_U=bu,
                                  PRECISE=y.is_cuda, num_warps=_warps(bu))
        ctx.save_for_backward(y, b1, b2)
        ctx.nc = nc
        return out

    @staticmethod
    def backward(ctx, dout):
        y, b1, b2 = ctx.saved_tensors
        B, NCP, H, HID, M = y.shape
        nc = ctx.nc
        dy = torch.empty_like(y)
        dpre = torch.empty(B, nc, H, HID, dtype=torch.float32, device=y.device)
        R = B * NCP * H
        if R:
            bu = _block(HID)
            grid = (triton.cdiv(R, ROWS), triton.cdiv(HID, bu))
            _phi_hidden_bwd[grid](y, b1, b2, dout.contiguous(), dy, dpre, R, nc, NCP, H, HID, M=M, ROWS=ROWS,
                                  BLOCK_U=bu, PRECISE=y.is_cuda, num_warps=_warps(bu))
        # the bias gradient as autograd sums a broadcast add's (one reduction), cast to each term's dtype
        dbias = dpre.sum_to_size(b1.shape)
        return dy, dbias.to(b1.dtype), dbias.to(b2.dtype), None, None


class _MeanOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sums, f, inv_l):
        B, NCP, H, D = sums.shape
        nc = f.shape[1]
        out = torch.empty_like(f)
        R = B * nc * H
        if R:
            bd = _block(D)
            _phi_mean_fwd[(triton.cdiv(R, ROWS), triton.cdiv(D, bd))](sums, f, out, R, nc, NCP, H, D, inv_l,
                                                                     M=NCP - nc + 1, ROWS=ROWS, BLOCK_D=bd,
                                                                     num_warps=_warps(bd))
        ctx.shape, ctx.inv_l = sums.shape, inv_l
        return out

    @staticmethod
    def backward(ctx, dout):
        B, NCP, H, D = ctx.shape
        nc = dout.shape[1]
        dsums = torch.empty(ctx.shape, dtype=torch.float32, device=dout.device)
        R = B * NCP * H
        if R:
            bd = _block(D)
            _phi_mean_bwd[(triton.cdiv(R, ROWS), triton.cdiv(D, bd))](dout.contiguous(), dsums, R, nc, NCP, H, D,
                                                                     ctx.inv_l, M=NCP - nc + 1, ROWS=ROWS, BLOCK_D=bd,
                                                                     num_warps=_warps(bd))
        return dsums, dout, None


def phi_hidden(y: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, nc: int, dtype: torch.dtype) -> torch.Tensor:
    """silu(sum_j y[:, i+j, :, :, j] + bias) in fp32 for blocks i < nc, in ``dtype``: y [B, nc+m-1,
    H, hidden, m] contiguous (16/32-bit); bias = b1 + b2 [hidden] summed in fp32 (phi: fc1's bias
    and fc1 of the position embedding) -> [B, nc, H, hidden]. Differentiable in y, b1 and b2."""
    if y.dim() != 5 or not y.is_contiguous() or b1.shape != y.shape[3:4] or b2.shape != y.shape[3:4]:
        raise ValueError(f"phi_hidden: y must be contiguous [B, N, H, hidden, m] and b1, b2 [hidden], got "
                         f"{tuple(y.shape)}, {tuple(b1.shape)} and {tuple(b2.shape)}")
    return _Hidden.apply(y, b1.contiguous(), b2.contiguous(), nc, dtype)


def phi_mean_out(sums: torch.Tensor, f: torch.Tensor, block: int) -> torch.Tensor:
    """(sum_j sums[:, i+j] / block) in f's dtype, plus f: sums [B, nc+m-1, H, D] fp32 (the
    chunks' sums), f [B, nc, H, D] (the MLP's output) -> [B, nc, H, D]. Differentiable in both."""
    if sums.dtype != torch.float32 or not sums.is_contiguous() or sums.dim() != 4 or f.dim() != 4:
        raise ValueError(f"phi_mean_out: sums must be contiguous fp32 [B, N, H, D], got {sums.dtype} "
                         f"{tuple(sums.shape)}")
    return _MeanOut.apply(sums, f.contiguous(), _reciprocal(block))


@functools.cache
def _reciprocal(block: int) -> float:
    """1 / block rounded to fp32: CUDA divides by a scalar as the product with it."""
    return float(torch.tensor(1.0, dtype=torch.float32) / block)

"""The selection's importance values themselves, not only the blocks they choose: the
whole-block chunks of ``_importance_aligned`` (weights from each token's offset, the spill
carried into the next chunk) against Eq. 9 / Eq. 10 in float64.

A chosen-block comparison can pass with a wrong importance (few candidates, or only forced
blocks); these values cannot."""
import math

import pytest
import torch

from _interp import kernels_or_skip

kernels, DEVICE = kernels_or_skip()
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from nsa_dist import NSAConfig  # noqa: E402
from nsa_dist.kernels import selection as sel  # noqa: E402
from nsa_dist.kernels.headdim import split_dim  # noqa: E402
from nsa_dist.kernels.range_attn import _nvis  # noqa: E402
from nsa_dist.ops.blocks import overlap_weights  # noqa: E402

_importance_aligned, _query_rows = sel._importance_aligned, sel._query_rows


@triton.jit
def _importance_kernel(Q, KC, LSE, OUT, scale2, HQ, DK, T, NB, G: tl.constexpr, GP: tl.constexpr,
                       BT: tl.constexpr, L: tl.constexpr, DS: tl.constexpr, LS: tl.constexpr, R: tl.constexpr,
                       E: tl.constexpr, BJP: tl.constexpr, BDK: tl.constexpr, BDK2: tl.constexpr,
                       BDK3: tl.constexpr):
    """One document from position 0: the selection kernel's rows and loop over chunks, storing
    each chunk's importance [BT, BJP] instead of merging it."""
    t0 = tl.program_id(0) * BT
    h = tl.program_id(1)
    H = HQ // G
    t1 = tl.minimum(t0 + BT, T)
    q, q_r, lse, nv_r, dk = _query_rows(Q, LSE, t0, t1, 0, h, HQ, DK, G, GP, BT, L, DS, BDK, BDK2, BDK3)
    t = t0 + tl.arange(0, BT)
    nv_max = _nvis(t1 - 1, L, DS)
    carry = tl.zeros([BT], tl.float32)
    for j0 in range(0, (t1 - 1) // LS + 1, BJP):
        imp, carry = _importance_aligned(q, q_r, KC, None, lse, nv_r, nv_max, j0, carry, 0, h, H, DK, dk, scale2,
                                         BT, GP, R, E, BJP, "ieee", BDK, BDK2, BDK3, False)
        j = j0 + tl.arange(0, BJP)
        tl.store(OUT + (t * H + h)[:, None] * NB + j[None, :], imp, mask=(t < t1)[:, None] & (j < NB)[None, :])


def _eq9_eq10(q, kc, cfg, G, scale):
    """float64 importance [T, H, NB] and the base-2 log-sum-exp [T, HQ] the kernel takes."""
    T, HQ, _ = q.shape
    Nc, H, _ = kc.shape
    l, d, ls = cfg.cmp_block, cfg.cmp_stride, cfg.sel_block
    NB = -(-T // ls)
    s = torch.einsum("thd,nhd->thn", q.double(), kc.double().repeat_interleave(G, 1)) * scale
    vis = (torch.arange(Nc)[None, :] * d + l - 1) <= torch.arange(T)[:, None]  # token i complete by t
    s = s.masked_fill(~vis[:, None, :], -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.nan_to_num(torch.exp(s - lse[..., None]))  # rows that see no token: 0
    imp = (p @ overlap_weights(Nc, NB, cfg)).view(T, H, G, NB).sum(2)
    lse2 = torch.where(torch.isfinite(lse), lse / math.log(2), torch.zeros((), dtype=lse.dtype))
    return imp, lse2.float()


SHAPES = [
    (1, 1, 1, 16, 16),  # R = 1: one token a block
    (2, 1, 2, 32, 16),  # R = E = 2
    (4, 2, 4, 32, 16),
    (1, 1, 4, 64, 16),  # R = 4, E = 1-4
    (2, 1, 4, 64, 16),
    (3, 1, 4, 64, 16),
    (4, 1, 4, 64, 16),
    (32, 16, 64, 64, 16),  # the paper's (l, d, l')
    (4, 2, 4, 32, 48),  # a head dim in three pieces, 3 x 16 (kernels/headdim.py)
    (4, 2, 4, 32, 80),  # in two, 64 + 16
]


# the paper's (l, d, l') at G = 3 (the slowest case in the interpreter) with `-m slow`; G = 3 on
# every other shape and the paper's at G = 1 by default
@pytest.mark.parametrize("G,l,d,ls,keys,DK", [
    pytest.param(G, *shape, marks=pytest.mark.slow if (G, shape) == (3, (32, 16, 64, 64, 16)) else ())
    for G in (1, 3) for shape in SHAPES])
def test_whole_block_importance_equals_eq9_eq10(G, l, d, ls, keys, DK):
    R, E = ls // d, l // d
    BJP, BT, H = keys // R, 16, 2
    BDK, BDK2, BDK3 = split_dim(DK)
    assert (BDK2, BDK3) == {16: (0, 0), 48: (16, 16), 80: (16, 0)}[DK]
    assert sel.aligned_chunks(l, d, ls, keys, 1, 16, triton.next_power_of_2(G))  # the kernel takes this path
    cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=ls, num_selected=3, window=0)
    T = 2 * BJP * ls + l + 1  # three chunks, the last cut short: the carry crosses two
    Nc = (T - l) // d + 1
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(T, G * H, DK, generator=gen)
    kc = torch.randn(Nc, H, DK, generator=gen)
    scale = DK ** -0.5
    want, lse2 = _eq9_eq10(q, kc, cfg, G, scale)
    NB = want.shape[-1]
    out = torch.full((T, H, NB), -1.0, device=DEVICE)
    _importance_kernel[(triton.cdiv(T, BT), H)](
        q.to(DEVICE), kc.to(DEVICE), lse2.to(DEVICE), out, scale / math.log(2), G * H, DK, T, NB,
        G=G, GP=triton.next_power_of_2(G), BT=BT, L=l, DS=d, LS=ls, R=R, E=E, BJP=BJP, BDK=BDK, BDK2=BDK2, BDK3=BDK3)
    cand = torch.arange(NB)[None, :] <= (torch.arange(T) // ls)[:, None]  # blocks up to the current
    got = out.cpu()
    for h in range(H):
        torch.testing.assert_close(got[:, h][cand], want[:, h][cand].float(), rtol=2e-5, atol=2e-6)

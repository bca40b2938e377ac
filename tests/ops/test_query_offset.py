"""Queries at an offset of the key sequence (``q_start``): the rows [q_start, q_start + Sq) of
the full call, exactly (fp64), with the same selection and the same gradients summed over a
partition of the queries (what context parallelism relies on)."""
import pytest
import torch

from nsa_dist import NSAConfig
from nsa_dist.ops import nsa_attention, select_blocks

from nsa_inputs import ARG_ORDER, args, random_nsa_inputs

CFG = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=4, window=16)
S = 96
# chunks of the queries: uneven, some shorter than the window (16), cutting documents
PARTS = [(0, 10), (10, 24), (24, 31), (31, 64), (64, 96)]
PACKED = torch.tensor([0, 27, 29, 70, 96], dtype=torch.int32)


def _inputs(cu):
    return random_nsa_inputs(CFG, S=S, HQ=4, H=2, Dk=8, dtype=torch.float64, seed=3, cu_seqlens=cu,
                             requires_grad=True)


@pytest.mark.parametrize("cu", [None, PACKED], ids=["dense", "packed"])
def test_query_chunks_equal_full_call(cu):
    x = _inputs(cu)
    w = torch.randn(1, S, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    o, idx = nsa_attention(*args(x), CFG, cu_seqlens=cu, backend="reference", return_indices=True)
    (o * w).sum().backward()
    full = {k: x[k].grad.clone() for k in ARG_ORDER}
    assert (idx >= 0).sum(-1).max() == CFG.num_selected  # some rows choose by importance
    for t in x.values():
        t.grad = None
    for a, b in PARTS:
        q, gates = x["q"][:, a:b], x["gates"][:, a:b]
        kv = [x[k] for k in ARG_ORDER[1:7]]
        o_p, idx_p = nsa_attention(q, *kv, gates, CFG, cu_seqlens=cu, backend="reference",
                                   return_indices=True, q_start=a)
        torch.testing.assert_close(o_p, o[:, a:b], rtol=0, atol=1e-12)
        assert torch.equal(idx_p, idx[:, a:b]), f"selection of rows [{a}, {b}) differs"
        sel = select_blocks(q.detach(), x["k_cmp"].detach(), CFG, cu_seqlens=cu, backend="reference",
                            q_start=a, seq_len=S)
        assert torch.equal(sel, idx[:, a:b])
        (o_p * w[:, a:b]).sum().backward()
    for k in ARG_ORDER:  # the chunks' gradients add up to the full call's
        torch.testing.assert_close(x[k].grad, full[k], rtol=0, atol=1e-10, msg=lambda m: f"grad {k}: {m}")
        assert full[k].abs().max() > 0


def test_query_range_checked():
    x = _inputs(None)
    kv = [x[k].detach() for k in ARG_ORDER[1:7]]
    q, g = x["q"].detach()[:, :40], x["gates"].detach()[:, :40]
    with pytest.raises(ValueError, match="do not fit in the key sequence"):
        nsa_attention(q, *kv, g, CFG, backend="reference", q_start=60)
    with pytest.raises(ValueError, match="q_start must be a non-negative int"):
        nsa_attention(q, *kv, g, CFG, backend="reference", q_start=-1)
    with pytest.raises(ValueError, match="gates must be"):
        nsa_attention(q, *kv, x["gates"].detach(), CFG, backend="reference", q_start=8)

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


# ---------------------------------------------------------------- the Triton kernels (interpreter)
KCFG = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=4, window=16)
KCASES = {
    # name: (B, S, HQ, H, cu_seqlens, (q_start, q_end)); the window is 16
    "G1-batch2-short": (2, 64, 2, 2, None, (37, 49)),  # 12 queries, fewer than the window
    "G4-packed": (1, 96, 4, 1, PACKED, (24, 75)),  # documents [0, 27), [27, 29), [29, 70) cross the edges
    "G2-packed-inside": (1, 96, 4, 2, PACKED, (52, 66)),  # inside one document, fewer than the window
}


@pytest.mark.parametrize("case,algo", [
    ("G4-packed", "block"), ("G1-batch2-short", "block-chunked"), ("G2-packed-inside", "query"),
    ("G4-packed", "block-chunked-gated"), ("G2-packed-inside", "query-gated"),
    pytest.param("G4-packed", "query", marks=pytest.mark.slow),
    pytest.param("G1-batch2-short", "query", marks=pytest.mark.slow),
    pytest.param("G2-packed-inside", "block", marks=pytest.mark.slow),
])
def test_kernels_at_an_offset_equal_the_reference(case, algo):
    """The Triton path with q_start (its own selection, the forced blocks in the range kernels)
    against the reference with q_start: outputs, indices, and the gradients of q, the gates
    and every key and value (keys past the queries get none). The selected branch block-major
    (in chunks of positions: "block-chunked") or position-major ("query"); "-gated": its last
    kernel writes the gate combination (``gate_fused``), the window's launch runs the
    forced blocks too (``window_forced``) and the range dq the gate backward (``gate_bwd_fused``)."""
    from _interp import kernels_or_skip, max_rel
    from nsa_dist.kernels.launch import LaunchConfig, use_launch

    kernels_or_skip()
    B, S_, HQ, H, cu, (a, b) = KCASES[case]
    x = random_nsa_inputs(KCFG, B=B, S=S_, HQ=HQ, H=H, Dk=16, dtype=torch.float32, seed=7, cu_seqlens=cu,
                          requires_grad=True)
    q, gates = x["q"][:, a:b], x["gates"][:, a:b]
    kv = [x[k] for k in ARG_ORDER[1:7]]
    o_ref, idx_ref = nsa_attention(q, *kv, gates, KCFG, cu_seqlens=cu, backend="reference", return_indices=True,
                                   q_start=a)
    launch = LaunchConfig(sel_algo=algo[:5], sel_dq_algo=algo[:5], gate_fused=algo.endswith("gated"),
                          window_forced=algo.endswith("gated"), gate_bwd_fused=algo.endswith("gated"))
    if "chunked" in algo:
        launch = launch.replace(split_bytes=4000)  # 7 positions a chunk: 4 chunks
    with use_launch(launch):
        o, idx = nsa_attention(q, *kv, gates, KCFG, cu_seqlens=cu, backend="triton", return_indices=True,
                               q_start=a)
        sel = select_blocks(q.detach(), x["k_cmp"].detach(), KCFG, cu_seqlens=cu, backend="triton", q_start=a,
                            seq_len=S_)
        assert torch.equal(idx, idx_ref) and torch.equal(sel, idx_ref)
        assert (idx_ref >= 0).sum(-1).max() == KCFG.num_selected
        assert max_rel(o, o_ref) < 1e-5
        do = torch.randn_like(o_ref)
        got = torch.autograd.grad(o, args(x), do)
    want = torch.autograd.grad(o_ref, args(x), do)
    for name, g, w in zip(ARG_ORDER, got, want):
        assert float(w.abs().max()) > 0, name
        assert max_rel(g, w) < 1e-4, f"d{name} differs: {max_rel(g, w):.2e}"
    assert float(got[3][:, b:].abs().max()) == 0.0  # no query sees the selected keys past b


@pytest.mark.parametrize("how", ["canonical", "plain", "reduced"])
def test_kernels_at_an_offset_with_a_given_or_reduced_selection(how):
    """Selections from outside the fused path, as the parallel layouts pass them: canonical
    indices (the group's selection, gathered), the same without the flag (the sparse kernels
    then run every block, the local ones clamped), or a reduce_importance hook (the reference
    selects, the kernels attend); fp16 inputs against the fp32 reference."""
    from _interp import kernels_or_skip, max_rel

    kernels_or_skip()
    B, S_, HQ, H, cu, (a, b) = KCASES["G4-packed"]
    x = random_nsa_inputs(KCFG, B=B, S=S_, HQ=HQ, H=H, Dk=16, dtype=torch.float16, seed=8, cu_seqlens=cu,
                          requires_grad=True)
    x32 = {k: v.detach().float().requires_grad_(True) for k, v in x.items()}
    kv, kv32 = [x[k] for k in ARG_ORDER[1:7]], [x32[k] for k in ARG_ORDER[1:7]]
    o_ref, idx_ref = nsa_attention(x32["q"][:, a:b], *kv32, x32["gates"][:, a:b], KCFG, cu_seqlens=cu,
                                   backend="reference", return_indices=True, q_start=a)
    extra = dict(reduce_importance=lambda imp: imp) if how == "reduced" else \
        dict(block_indices=idx_ref, canonical_indices=how == "canonical")
    o, idx = nsa_attention(x["q"][:, a:b], *kv, x["gates"][:, a:b], KCFG, cu_seqlens=cu, backend="triton",
                           return_indices=True, q_start=a, **extra)
    assert o.dtype == torch.float16 and torch.equal(idx, idx_ref)
    assert max_rel(o, o_ref) < 5e-3
    do = torch.randn_like(o_ref)
    got = torch.autograd.grad(o, args(x), do.half())
    want = torch.autograd.grad(o_ref, args(x32), do)
    for name, g, w in zip(ARG_ORDER, got, want):
        assert max_rel(g, w) < 1e-2, f"d{name}: {max_rel(g, w):.2e}"

"""GPU acceptance of the kernels' query offset (context parallelism's query chunks), skipped
without CUDA: bf16 chunks against the fp32 reference at the same offset, fp32 chunks against
the rows of the full kernel call (the same selection, bit for bit), and no host sync."""
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="needs CUDA (and the compiled, not interpreted, kernels)")]

NAMES = ("q", "k_cmp", "v_cmp", "k_sel", "v_sel", "k_win", "v_win", "gates")
S = 4096
# the zigzag chunks of cp = 2 (rank 0: 0 and 3; rank 1: 1 and 2) and a short one inside a window
CHUNKS = [(0, 1024), (1024, 2048), (2048, 3072), (3072, 4096), (1500, 1700)]
DOCS = [0, 1000, 1003, 2100, 4096]  # documents crossing every chunk edge


def _rel_rms(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def _inputs(G, B, cu, dtype, H=2, D=128, seed=0):
    from nsa_dist import NSAConfig
    from nsa_dist.ops import compress

    cfg = NSAConfig()
    gen = torch.Generator(device="cuda").manual_seed(seed + G)
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda")  # noqa: E731
    x = dict(q=r(B, S, G * H, D), k_cmp=compress(r(B, S, H, D), cfg, cu_seqlens=cu),
             v_cmp=compress(r(B, S, H, D), cfg, cu_seqlens=cu), k_sel=r(B, S, H, D), v_sel=r(B, S, H, D),
             k_win=r(B, S, H, D), v_win=r(B, S, H, D), gates=torch.rand(B, S, G * H, 3, generator=gen, device="cuda"))
    return cfg, {k: v.to(dtype).requires_grad_(True) for k, v in x.items()}


def _chunk(x, a, b):
    """(q, K/V..., gates) of the query rows [a, b): every key."""
    return [x[k][:, a:b] if k in ("q", "gates") else x[k] for k in NAMES]


@pytest.mark.parametrize("packed", [False, True], ids=["batch2", "packed"])
@pytest.mark.parametrize("G", [1, 4, 16])
def test_bf16_chunks_within_5e3_of_the_fp32_reference(G, packed):
    """Each chunk on the kernels (their own selection, bf16) against the fp32 reference with
    that selection at the same offset: relative RMS <= 5e-3 of the output and of the
    gradients of q, the gates and every key and value."""
    from nsa_dist.ops import nsa_attention

    cu = torch.tensor(DOCS, dtype=torch.int32) if packed else None
    cfg, xb = _inputs(G, 1 if packed else 2, cu, torch.bfloat16)
    x32 = {k: v.detach().float().requires_grad_(True) for k, v in xb.items()}
    for a, b in CHUNKS:
        o, idx = nsa_attention(*_chunk(xb, a, b), cfg, cu_seqlens=cu, backend="triton", return_indices=True,
                               q_start=a)
        o_ref = nsa_attention(*_chunk(x32, a, b), cfg, cu_seqlens=cu, backend="reference", block_indices=idx,
                              q_start=a)
        do = torch.randn_like(o_ref)
        got = torch.autograd.grad(o, [xb[k] for k in NAMES], do.bfloat16())
        want = torch.autograd.grad(o_ref, [x32[k] for k in NAMES], do)
        errs = {"o": _rel_rms(o, o_ref)}
        errs.update({"d" + k: _rel_rms(g, w) for k, g, w in zip(NAMES, got, want)})
        assert max(errs.values()) <= 5e-3, ((a, b), errs)


@pytest.mark.parametrize("G", [4, 16])
def test_fp32_chunks_equal_the_full_calls_rows(G):
    """fp32 (no TF32) chunks on the kernels: the full kernel call's selection, exactly, its
    output rows (1e-5) and, summed over a partition of the queries, its gradients (1e-5)."""
    from nsa_dist.ops import nsa_attention

    cu = torch.tensor(DOCS, dtype=torch.int32)
    cfg, x = _inputs(G, 1, cu, torch.float32, seed=1)
    o_full, idx_full = nsa_attention(*_chunk(x, 0, S), cfg, cu_seqlens=cu, backend="triton", return_indices=True)
    do = torch.randn_like(o_full)
    full = torch.autograd.grad(o_full, [x[k] for k in NAMES], do)
    summed = [torch.zeros_like(g) for g in full]
    for a, b in CHUNKS[:4]:
        o, idx = nsa_attention(*_chunk(x, a, b), cfg, cu_seqlens=cu, backend="triton", return_indices=True,
                               q_start=a)
        assert torch.equal(idx, idx_full[:, a:b]), (a, b)
        assert _rel_rms(o, o_full[:, a:b]) < 1e-5
        for s_, g in zip(summed, torch.autograd.grad(o, [x[k] for k in NAMES], do[:, a:b])):
            s_ += g
    for k, s_, g in zip(NAMES, summed, full):
        assert _rel_rms(s_, g) < 1e-5, k


@pytest.mark.parametrize("G", [4, 16])
def test_chunk_queues_without_a_host_sync(G):
    """A query chunk's forward and backward (packed documents, cu_seqlens on the CPU) never
    wait for the GPU once the chunk's geometry exists."""
    from nsa_dist.ops import nsa_attention

    cu = torch.tensor(DOCS, dtype=torch.int32)
    cfg, x = _inputs(G, 1, cu, torch.bfloat16, seed=2)
    a, b = CHUNKS[3]
    do = torch.randn(1, b - a, x["q"].shape[2], 128, device="cuda", dtype=torch.bfloat16)
    nsa_attention(*_chunk(x, a, b), cfg, cu_seqlens=cu, backend="triton", q_start=a).backward(do)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o = nsa_attention(*_chunk(x, a, b), cfg, cu_seqlens=cu, backend="triton", q_start=a)
        o.backward(do)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(o).all() and all(torch.isfinite(x[k].grad).all() for k in NAMES)

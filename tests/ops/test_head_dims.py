"""Large head dims in fp32 (issue 25): Dk = 192 / Dv = 128 and Dk = Dv = 256 run with tiles
shrunk to fit shared memory (``LaunchConfig.fit``) and match the reference, forward, selection
and every gradient, through Triton's interpreter on the CPU (the GPU runs the same tiles:
tests/ops/test_kernels_gpu.py)."""
import pytest
import torch

from nsa_dist import NSAConfig, ops
from nsa_inputs import args, random_nsa_inputs

from _interp import kernels_or_skip, max_rel, record_descriptors

NAMES = ("q", "k_cmp", "v_cmp", "k_sel", "v_sel", "k_win", "v_win", "gates")


# Dk = 192 / Dv = 128 with `-m slow`: by default it runs in pieces below (192-two, 192-query-general)
@pytest.mark.parametrize("dk,dv", [pytest.param(192, 128, marks=pytest.mark.slow), (256, 256)])
def test_fp32_large_head_dims_match_the_reference(dk, dv):
    _, device = kernels_or_skip()
    from nsa_dist.kernels.launch import DEFAULT
    from nsa_dist.kernels.nsa import make_geometry

    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=4, window=16)
    cu = torch.tensor([0, 45, 96], dtype=torch.int32)
    x = random_nsa_inputs(cfg, S=96, HQ=8, H=2, Dk=dk, Dv=dv, seed=7, cu_seqlens=cu, requires_grad=True,
                          device=device)
    cu = cu.to(device)
    geo = make_geometry(x["q"], x["k_cmp"], x["v_sel"], cfg, cu)
    assert geo.prec == "ieee"  # PyTorch's default fp32 matmul precision: no TF32
    shrunk = [k for k in ("range_dq", "range_dkdv", "sel_dkdv", "sel_dq_split")
              if geo.tiles(k).launch != DEFAULT.warps(k) or geo.tiles(k).block_m < 64]
    assert shrunk, "the fitted tiles are what this test runs"
    o, idx = ops.nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="triton", return_indices=True)
    o_ref, idx_ref = ops.nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="reference", return_indices=True)
    assert torch.equal(idx, idx_ref)
    assert max_rel(o, o_ref) < 1e-5
    do = torch.randn_like(o_ref)
    grads = torch.autograd.grad(o, args(x), do)
    grads_ref = torch.autograd.grad(o_ref, args(x), do)
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert max_rel(g, g_ref) < 1e-5, f"d{name}: {max_rel(g, g_ref):.2e}"


def test_fp32_selection_at_dk_256_and_a_group_of_16_matches_the_reference(monkeypatch):
    """16 heads a group at Dk = 256 in fp32: the selection's query rows alone would exceed
    shared memory at 16 positions a program, so it runs 4 positions a program with the
    general chunks (no whole-block chunks below 16 positions); the choice is the reference's."""
    kernels, device = kernels_or_skip()
    from nsa_dist.kernels import selection

    launched = []
    real = selection._select_topn

    class Spy:
        def __getitem__(self, grid):
            def run(*a, **kw):
                launched.append((kw["BT"], kw["ALIGNED"], kw["num_stages"]))
                return real[grid](*a, **kw)
            return run
    monkeypatch.setattr(selection, "_select_topn", Spy())
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=5, window=0)
    x = random_nsa_inputs(cfg, S=80, HQ=16, H=1, Dk=256, seed=3, device=device)
    got = kernels.select_blocks(x["q"], x["k_cmp"], cfg)
    assert torch.equal(got, ops.select_blocks(x["q"], x["k_cmp"], cfg, backend="reference"))
    assert launched == [(4, False, 2)]


def test_wider_launches_of_large_accumulators_match_the_reference():
    """Dk = 192 / Dv = 128, G = 4 (the seeds' heads) with LaunchConfig.acc_regs low enough that
    every kernel with accumulators runs 8 warps: the same results as the reference."""
    _, device = kernels_or_skip()
    from nsa_dist.kernels.launch import DEFAULT, LaunchConfig, use_launch
    from nsa_dist.kernels.nsa import make_geometry

    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=4, window=16)
    x = random_nsa_inputs(cfg, S=64, HQ=8, H=2, Dk=192, Dv=128, seed=3, requires_grad=True, device=device)
    with use_launch(LaunchConfig(acc_regs=16)):
        geo = make_geometry(x["q"], x["k_cmp"], x["v_sel"], cfg, None)
        widened = [k for k in ("range_fwd", "range_dq", "range_dkdv", "sel_split", "sel_dq_split", "sel_dkdv")
                   if geo.tiles(k).launch["num_warps"] == 8 > DEFAULT.warps(k)["num_warps"]]
        assert len(widened) == 6, widened
        o = ops.nsa_attention(*args(x), cfg, backend="triton")
        do = torch.randn_like(o)
        grads = torch.autograd.grad(o, args(x), do)
    o_ref = ops.nsa_attention(*args(x), cfg, backend="reference")
    grads_ref = torch.autograd.grad(o_ref, args(x), do)
    assert max_rel(o, o_ref) < 1e-5
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert max_rel(g, g_ref) < 1e-5, f"d{name}: {max_rel(g, g_ref):.2e}"


def test_head_dims_split_into_power_of_two_pieces():
    """3 x 2^k runs as three equal pieces; a power of two plus a smaller one as those two where
    narrower than one padded tile ("two" for every such dim); powers of two, dims no narrower in
    pieces, and "one" keep one tile."""
    from nsa_dist.kernels.headdim import split_dim

    assert split_dim(192) == (64, 64, 64) and split_dim(96) == (32, 32, 32) and split_dim(48) == (16, 16, 16)
    assert split_dim(192, "two") == (128, 64, 0) and split_dim(96, "two") == (64, 32, 0)
    assert split_dim(160) == (128, 32, 0) and split_dim(136) == (128, 16, 0)  # the rest padded to 16
    assert split_dim(192, "one") == (256, 0, 0)
    for d, whole in ((128, 128), (256, 256), (16, 16), (8, 16), (24, 32), (200, 256), (112, 128)):
        assert split_dim(d) == (whole, 0, 0), d
    for mode in ("auto", "two", "one"):
        for d in range(1, 257):
            w = split_dim(d, mode)
            assert sum(w) >= d and w[0] >= 16 and all(x & (x - 1) == 0 for x in w), (d, mode, w)
            assert sum(w) <= max(16, 2 ** (d - 1).bit_length()), (d, mode, w)  # never wider than padded
            assert w[2] in (0, w[0]) and (w[1] == 0 or 16 <= w[1] <= w[0]), (d, mode, w)
    with pytest.raises(ValueError, match="one of"):
        split_dim(192, "three")


# case: (Dk, Dv, dtype, LaunchConfig settings, Dk's pieces). Position-major selected kernels and
# the general (overlap-matrix) selection chunks at 192 = 3 x 64; block-major ones with atomic
# query chunks of the compressed dK/dV at 96 = 3 x 32; 192 as 128 + 64 ("two"); fp16 at 96 and
# 48 = 3 x 16; 136 = 128 + 8 (the second piece 16 wide, half masked); 96 padded to 128 ("one",
# the A/B's base)
PIECES = {
    "136-masked": (136, 32, torch.float32, {}, (128, 16, 0)),
    "96-padded": (96, 64, torch.float32, dict(head_dim_pieces="one"), (128, 0, 0)),
    "192-query-general": (192, 128, torch.float32, dict(sel_algo="query", sel_dq_algo="query",
                                                         select_aligned=False), (64, 64, 64)),
    # (the unfused block-major dq at Dk >= sel_dq_fused_min_dk: the dK/dV kernel, then the dq kernel)
    "192-two": (192, 128, torch.float32, dict(head_dim_pieces="two", sel_dq_algo="block"), (128, 64, 0)),
    "96-block-chunked": (96, 64, torch.float32, dict(dkdv_qchunk=32), (32, 32, 32)),
    "96-fp16": (96, 64, torch.float16, {}, (32, 32, 32)),
    "96-fused-fp16": (96, 64, torch.float16, dict(sel_dq_algo="fused", sel_l2_hints=True), (32, 32, 32)),
    "192-fused": (192, 128, torch.float32, dict(sel_dq_algo="fused"), (64, 64, 64)),  # the default there
    "48-fp16-query": (48, 32, torch.float16, dict(sel_algo="query", sel_dq_algo="query"), (16, 16, 16)),
}


# fp16 at 96 with `-m slow`: fp16 pieces by default at 48 (48-fp16-query)
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "96-fp16" else c
                                  for c in sorted(PIECES)])
def test_head_dims_in_pieces_match_the_reference(case, monkeypatch):
    """Dk in column pieces (kernels/headdim.py) in every kernel, or padded: selection, forward
    and all gradients against the reference, fp32 to 1e-5 and fp16 against the fp32 reference
    as tests/ops/test_kernels_interp.py holds fp16 (packed documents, G = 4). Equal pieces
    load through TMA boxes (the defaults), the others through pointers."""
    _, device = kernels_or_skip()
    from nsa_dist.kernels import tma
    from nsa_dist.kernels.launch import LaunchConfig, use_launch
    from nsa_dist.kernels.nsa import make_geometry

    dk, dv, dtype, settings, pieces = PIECES[case]
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=4, window=16)
    cu = torch.tensor([0, 45, 96], dtype=torch.int32)
    x = random_nsa_inputs(cfg, S=96, HQ=8, H=2, Dk=dk, Dv=dv, dtype=dtype, seed=5, cu_seqlens=cu,
                          requires_grad=True, device=device)
    x32 = {k: v.detach().double().requires_grad_(True) for k, v in x.items()}
    cu = cu.to(device)
    made = []  # per call of a TMA helper: did it make descriptors
    for name in ("kv_descriptors", "row_descriptors"):
        record_descriptors(monkeypatch, tma, name, made)
    with use_launch(LaunchConfig(**settings)):
        geo = make_geometry(x["q"], x["k_cmp"], x["v_sel"], cfg, cu)
        assert geo.dk_pieces() == dict(BDK=pieces[0], BDK2=pieces[1], BDK3=pieces[2])
        o, idx = ops.nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="triton", return_indices=True)
        do = torch.randn(o.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(o, args(x), do.to(dtype))
    # equal unpadded pieces come through TMA boxes (on a GPU only 16-bit inputs), others the pointer loads
    equal = pieces[1] in (0, pieces[0]) and pieces[2] in (0, pieces[0]) and sum(pieces) == dk
    assert made and all(m == (equal and (device == "cpu" or dtype != torch.float32)) for m in made), made
    o_ref, idx_ref = ops.nsa_attention(*args(x32), cfg, cu_seqlens=cu, backend="reference", return_indices=True)
    grads_ref = torch.autograd.grad(o_ref, args(x32), do)
    if dtype == torch.float32:
        assert torch.equal(idx, idx_ref)
    else:  # fp16 queries may break near-ties differently: the selection against the fp16 inputs' own
        q16, k16 = x["q"].detach().double(), x["k_cmp"].detach().double()
        assert torch.equal(idx, ops.select_blocks(q16, k16, cfg, cu_seqlens=cu, backend="reference"))
    o_tol, g_tol = (1e-5, 1e-5) if dtype == torch.float32 else (5e-3, 1e-2)
    assert max_rel(o, o_ref) < o_tol
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert max_rel(g, g_ref) < g_tol, f"d{name}: {max_rel(g, g_ref):.2e}"

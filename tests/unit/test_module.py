"""NSAAttention as a layer: projections, RoPE, phi, gates, packed documents, stats."""
import pytest
import torch

from nsa_dist import NSAConfig
from nsa_dist.modules import MLPCompressor, NSAAttention
from nsa_dist.ops import compress

CFG = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=4, window=16)


def layer(**kw):
    torch.manual_seed(0)
    cfg = kw.pop("cfg", CFG)
    return NSAAttention(64, 4, 2, 16, kw.pop("v_head_dim", 0), cfg, backend="reference", **kw).double()


def test_shapes_and_stats():
    m = layer()
    x = torch.randn(2, 50, 64, dtype=torch.float64)
    y, stats = m(x, return_stats=True, stats_head=1)
    assert y.shape == x.shape
    assert torch.allclose(stats.gate_mean, torch.full((3,), 0.5, dtype=torch.float32))  # zero-init gate
    assert stats.selected_blocks.shape == (50, 4)
    # tokens read: cmp = mean Nc(t+1); win = mean min(w, t+1)
    t = torch.arange(50, dtype=torch.float64)
    cmp = torch.where(t + 1 >= 8, torch.floor((t + 1 - 8) / 4) + 1, torch.zeros_like(t)).mean()
    assert torch.isclose(stats.tokens_read[0], cmp) and torch.isclose(stats.tokens_read[2], t.add(1).clamp(max=16).mean())
    assert 0 < stats.tokens_read[1] <= 64
    y2, none = m(x)
    assert none is None and torch.equal(y, y2)


def test_shared_kv_has_one_projection_per_kind():
    m = layer(cfg=NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=4, window=16, shared_kv=True))
    assert list(m.k_proj.keys()) == ["shared"] and list(m.v_proj.keys()) == ["shared"]
    p = m.project(torch.randn(1, 40, 64, dtype=torch.float64), torch.arange(40))
    assert torch.equal(p["k_sel"], p["k_win"]) and torch.equal(p["v_sel"], p["v_win"])
    assert len(list(layer().k_proj.keys())) == 3


def test_mlp_phi_starts_as_mean_pooling_and_learns():
    phi = MLPCompressor(8, 16).double()
    k = torch.randn(1, 40, 2, 16, dtype=torch.float64)
    cfg = CFG
    assert torch.allclose(compress(k, cfg, phi), compress(k, cfg), atol=1e-12)
    out = compress(k, cfg, phi).sum()
    out.backward()
    assert phi.fc2.weight.grad.abs().sum() > 0


def test_packed_documents_equal_separate_calls():
    m = layer(cfg=NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=4, window=16, phi="mlp"))
    x = torch.randn(1, 70, 64, dtype=torch.float64)
    cu = torch.tensor([0, 25, 70], dtype=torch.int32)
    y, _ = m(x, cu_seqlens=cu)
    y0, _ = m(x[:, :25])
    y1, _ = m(x[:, 25:])
    assert torch.allclose(y, torch.cat([y0, y1], 1), atol=1e-12)


def test_gradients_reach_every_parameter():
    m = layer(cfg=NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=4, window=16, phi="mlp"))
    y, _ = m(torch.randn(1, 48, 64, dtype=torch.float64))
    y.square().sum().backward()
    # fc2 layers start at zero, so fc1 and pos only get gradient after a step; the rest now.
    missing = [n for n, p in m.named_parameters()
               if (p.grad is None or p.grad.abs().sum() == 0) and not n.endswith(("fc1.weight", "fc1.bias", "pos"))]
    assert missing == []


def test_rope_positions_restart_per_document():
    from nsa_dist.modules import position_ids_from_cu_seqlens
    pos = position_ids_from_cu_seqlens(torch.tensor([0, 3, 3, 7], dtype=torch.int32), 7)
    assert pos.tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert pos.dtype == torch.int64 and pos.device.type == "cpu"
    moved = position_ids_from_cu_seqlens(torch.tensor([0, 7]), 7, device=torch.device("meta"))
    assert moved.device.type == "meta" and moved.shape == (7,)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        NSAAttention(64, 6, 4, 16, config=CFG)
    with pytest.raises(ValueError, match="backend"):
        NSAAttention(64, 4, 2, 16, config=CFG, backend="flash")
    with pytest.raises(ValueError, match=r"\[B, S, hidden\]"):
        layer()(torch.randn(50, 64, dtype=torch.float64))


@pytest.mark.parametrize("block,stride,length", [(8, 4, 40), (8, 4, 43), (8, 2, 30), (6, 4, 30), (8, 8, 24), (8, 4, 7)])
def test_mlp_phi_over_a_sequence_equals_phi_over_its_blocks(block, stride, length):
    """MLPCompressor.sequence (chunks of d positions, no overlapping copies when d divides
    l; the blocks otherwise) equals phi over the unfolded blocks (fp64), gradients included,
    with a trained-looking (nonzero) position embedding and output layer."""
    from nsa_dist.modules import MLPCompressor

    torch.manual_seed(0)
    phi = MLPCompressor(block, 16, stride=stride).double()
    with torch.no_grad():
        for p in phi.parameters():
            p.normal_(0.0, 0.2)
    k = torch.randn(2, length, 3, 16, dtype=torch.float64, requires_grad=True)
    nc = max(0, (length - block) // stride + 1)
    want = phi(k[:, :(nc - 1) * stride + block].unfold(1, block, stride).transpose(-1, -2)) if nc else None
    if not nc:
        assert phi.sequence(k).shape == (2, 0, 3, 16)
        return
    got = phi.sequence(k)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(want)
    g_want = torch.autograd.grad(want, [k, *phi.parameters()], gy)
    g_got = torch.autograd.grad(got, [k, *phi.parameters()], gy)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="stride=d"):
        MLPCompressor(block, 16).double().sequence(k)

"""Block arithmetic: Nc(S), Eq. 9 overlap weights (property tests), compression."""
import torch
from hypothesis import given, settings, strategies as st

from nsa_dist import NSAConfig
from nsa_dist.ops import compress, compressed_cu_seqlens, num_compressed, overlap_weights


def test_num_compressed_formula():
    cfg = NSAConfig()  # l=32, d=16
    assert [num_compressed(s, cfg) for s in (0, 31, 32, 47, 48, 64, 65536)] == [0, 0, 1, 1, 2, 3, 4095]


@st.composite
def block_configs(draw):
    d = draw(st.sampled_from([1, 2, 4, 8, 16]))
    l = d * draw(st.integers(1, 6))
    ls = l * draw(st.integers(1, 3)) if draw(st.booleans()) else d * draw(st.integers(l // d, 12))
    return NSAConfig(cmp_block=l, cmp_stride=d, sel_block=ls, num_selected=3, window=0)


@settings(max_examples=60, deadline=None)
@given(block_configs(), st.integers(1, 300))
def test_overlap_weights_match_interval_definition(cfg, S):
    Nc, Ns = num_compressed(S, cfg), -(-S // cfg.sel_block)
    W = overlap_weights(Nc, Ns, cfg)
    l, d, ls = cfg.cmp_block, cfg.cmp_stride, cfg.sel_block
    for i in range(Nc):
        covered = set(range(i * d, i * d + l))
        for j in range(Ns):
            assert W[i, j] * d == len(covered & set(range(j * ls, (j + 1) * ls)))
        # Each compressed token spreads its whole block (l positions) over selection blocks.
        assert W[i].sum() * d == l


def test_overlap_identity_when_blocks_coincide():
    cfg = NSAConfig(cmp_block=16, cmp_stride=16, sel_block=16, num_selected=3)
    W = overlap_weights(10, 10, cfg)
    assert torch.equal(W, torch.eye(10, dtype=torch.float64))


def test_compress_mean_and_packed():
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, num_selected=3)
    k = torch.arange(2 * 10 * 1 * 1, dtype=torch.float64).view(2, 10, 1, 1)
    out = compress(k, cfg)
    assert out.shape == (2, num_compressed(10, cfg), 1, 1)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([1.5, 3.5, 5.5, 7.5], dtype=torch.float64))
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    packed = compress(k[:1], cfg, cu_seqlens=cu)
    assert packed.shape[1] == int(compressed_cu_seqlens(cu, cfg)[-1]) == 0 + 2  # 3 tokens: none; 7 tokens: 2
    assert torch.equal(packed, compress(k[:1, 3:], cfg))


def test_host_offsets_match_the_tensor_form():
    """The host-side offsets (what validation and the kernels' geometry read, with no GPU
    sync) agree with compressed_cu_seqlens, and check_cu_seqlens hands the values back."""
    from nsa_dist.ops.blocks import compressed_offsets, host_offsets
    from nsa_dist.ops.validation import check_cu_seqlens

    cfg = NSAConfig()  # l=32, d=16
    cu = torch.tensor([0, 31, 31, 32, 100, 4196], dtype=torch.int32)
    assert host_offsets(cu) is cu and host_offsets(None) is None
    assert check_cu_seqlens(cu, 1, 4196) == cu.tolist()
    want = compressed_cu_seqlens(cu, cfg)
    assert want.dtype == torch.int64 and compressed_offsets(cu.tolist(), cfg) == want.tolist()
    assert want.tolist() == [0, 0, 0, 0, 3, 3 + num_compressed(4096, cfg)]  # lengths 31, 0, 1, 68, 4096

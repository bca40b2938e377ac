"""cu_seqlens holding one document (the trainer's one-document samples) runs the unpacked path:
the same function, and a wrong single-document cu_seqlens is still refused."""
import pytest
import torch

from nsa_dist import NSAConfig, ops
from nsa_inputs import args, random_nsa_inputs

CFG = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=3, window=16)


def test_one_document_equals_no_cu_seqlens():
    from nsa_dist.ops.blocks import packed

    two = torch.tensor([0, 30, 72])
    assert packed(torch.tensor([0, 72])) is None and packed(two) is two and packed(None) is None
    x = random_nsa_inputs(CFG, S=72, dtype=torch.float64)
    cu = torch.tensor([0, 72], dtype=torch.int32)
    o1, i1 = ops.nsa_attention(*args(x), CFG, cu_seqlens=cu, return_indices=True)
    o0, i0 = ops.nsa_attention(*args(x), CFG, return_indices=True)
    assert torch.equal(o1, o0) and torch.equal(i1, i0)
    k = torch.randn(1, 72, 2, 16, dtype=torch.float64)
    assert torch.equal(ops.compress(k, CFG, cu_seqlens=cu), ops.compress(k, CFG))
    assert torch.equal(ops.select_blocks(x["q"], x["k_cmp"], CFG, cu_seqlens=cu), i0)


def test_a_wrong_single_document_is_still_refused():
    x = random_nsa_inputs(CFG, S=72, dtype=torch.float64)
    bad = torch.tensor([0, 70], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ops.nsa_attention(*args(x), CFG, cu_seqlens=bad)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ops.compress(torch.randn(1, 72, 2, 16), CFG, cu_seqlens=bad)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ops.select_blocks(x["q"], x["k_cmp"], CFG, cu_seqlens=bad)

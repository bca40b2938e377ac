"""Pure helpers of the benchmark tools (no GPU needed)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import bench_kernels  # noqa: E402


def test_idle_gaps_merge_overlapping_streams_and_name_the_neighbours():
    # two streams: "a" overlaps "b"; "c" starts after a gap of 3 behind "b", "d" inside "c"
    span, busy, gaps = bench_kernels.idle_gaps([(10, 14, "c"), (0, 4, "a"), (2, 7, "b"), (11, 12, "d"),
                                                (16, 17, "e")])
    assert span == 17 and busy == 7 + 4 + 1
    assert gaps == [(3, "b", "c"), (2, "c", "e")]  # longest first, named by what ended last before


def test_idle_gaps_without_activity_is_an_error():
    with pytest.raises(ValueError, match="no GPU activity"):
        bench_kernels.idle_gaps([])


def test_profile_attention_packs_equal_documents_and_counts_syncs():
    import torch

    import profile_attention

    assert profile_attention._offsets(10, 3) == [0, 3, 6, 10]
    assert profile_attention._offsets(8, 1) == [0, 8]
    if not torch.cuda.is_available():  # sync debug mode needs CUDA; on the CPU nothing syncs
        pytest.skip("needs CUDA")
    x = torch.ones(4, device="cuda")
    assert profile_attention._syncs(lambda: x.sum().item()) >= 1
    assert profile_attention._syncs(lambda: x.sum()) == 0

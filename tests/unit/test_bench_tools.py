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

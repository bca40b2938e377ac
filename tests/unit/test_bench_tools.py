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


def test_ab_alternates_a_kernel_constant_with_its_default_and_restores_it(monkeypatch):
    """--ab sets a constant of kernels.nsa, then its default, each round, and puts it back;
    a name that is not a constant there is refused by name."""
    import importlib

    kernels = bench_kernels._import_kernels()
    nsa = importlib.import_module(kernels.__name__ + ".nsa")
    default = nsa.DKDV_SEG_ROWS
    seen = []

    def fake_bench(name, S, rows, kernels):
        seen.append(nsa.DKDV_SEG_ROWS)
        rows.append({"nsa_fwd_ms": 1.0, "nsa_bwd_ms": 2.0})
    monkeypatch.setattr(bench_kernels, "bench_shape", fake_bench)
    bench_kernels.ab_shape("a_paper", 8, kernels, "DKDV_SEG_ROWS=96", rounds=3)
    assert seen == [96, default, default, 96, 96, default]  # A B, B A, A B
    assert nsa.DKDV_SEG_ROWS == default
    with pytest.raises(SystemExit, match="'NO_SUCH' is not a constant"):
        bench_kernels.ab_shape("a_paper", 8, kernels, "NO_SUCH=1", rounds=1)
    with pytest.raises(SystemExit, match="DKDV_SEG_ROWS is a int"):
        bench_kernels.ab_shape("a_paper", 8, kernels, "DKDV_SEG_ROWS=lots", rounds=1)
    assert nsa.DKDV_SEG_ROWS == default
    # another kernel module's constant, by module.NAME
    sel = importlib.import_module(kernels.__name__ + ".selection")
    seen.clear()
    monkeypatch.setattr(bench_kernels, "bench_shape",
                        lambda name, S, rows, kernels: (seen.append(sel.SELECT_ALIGNED), rows.append({
                            "nsa_fwd_ms": 1.0, "nsa_bwd_ms": 2.0})))
    bench_kernels.ab_shape("a_paper", 8, kernels, "selection.SELECT_ALIGNED=False", rounds=2)
    assert seen == [False, True, True, False] and sel.SELECT_ALIGNED is True
    with pytest.raises(SystemExit, match="'no_such' is not a kernel module"):
        bench_kernels.ab_shape("a_paper", 8, kernels, "no_such.X=1", rounds=1)

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


def test_ab_alternates_a_launch_config_with_the_defaults(monkeypatch):
    """--ab runs the function under a LaunchConfig with the given settings, then under the
    defaults, each round (A B, B A, ...); a bad name or value is refused with LaunchConfig's
    message, before anything runs."""
    pytest.importorskip("triton")
    from nsa_dist.kernels.launch import LaunchConfig, current_launch

    seen = []

    def fake_bench(name, S, rows):
        seen.append(current_launch())
        rows.append({"nsa_fwd_ms": 1.0, "nsa_bwd_ms": 2.0})
    monkeypatch.setattr(bench_kernels, "bench_shape", fake_bench)
    bench_kernels.ab_shape("a_paper", 8, "sel_dkdv_seg_rows=96,range_fwd=(8, 3),sel_algo=query", rounds=3)
    changed = LaunchConfig(sel_dkdv_seg_rows=96, range_fwd=(8, 3), sel_algo="query")
    assert seen == [changed, LaunchConfig(), LaunchConfig(), changed, changed, LaunchConfig()]
    assert current_launch() == LaunchConfig()  # the defaults again outside the runs
    seen.clear()
    with pytest.raises(SystemExit, match="did you mean 'sel_dkdv_seg_rows'"):
        bench_kernels.ab_shape("a_paper", 8, "sel_dkdv_seg_row=96", rounds=1)
    with pytest.raises(SystemExit, match="sel_dkdv_seg_rows must be a positive int"):
        bench_kernels.ab_shape("a_paper", 8, "sel_dkdv_seg_rows=lots", rounds=1)
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        bench_kernels.ab_shape("a_paper", 8, "DKDV 1024", rounds=1)
    assert seen == []


def test_every_sweep_option_is_a_valid_launch_config():
    """The sweep tables of bench_kernels (--sweep) and bench_selection (--sweep) name only
    LaunchConfig settings with valid values, so no option fails only on the GPU."""
    pytest.importorskip("triton")
    import itertools

    import bench_selection
    from nsa_dist.kernels.launch import LaunchConfig

    for key, values in bench_kernels.SWEEP.items():
        for val in values:
            assert bench_kernels.launch_config(bench_kernels.sweep_settings(key, val)) != LaunchConfig(), (key, val)
    for vals in itertools.product(*bench_selection.GRID.values()):
        LaunchConfig(**dict(zip(bench_selection.GRID, vals)))

"""The kernels' launch configuration (kernels/launch.py): one checked, frozen set of knobs."""
import dataclasses

import pytest

from nsa_dist.kernels.launch import DEFAULT, LaunchConfig, current_launch, use_launch


def test_unknown_setting_names_the_closest_and_the_valid_ones():
    with pytest.raises(ValueError, match="unknown setting 'sel_seg_row'; did you mean 'sel_seg_rows'") as err:
        LaunchConfig(sel_seg_row=2048)
    assert "range_fwd_keys" in str(err.value) and "select_rows_aligned" in str(err.value)
    with pytest.raises(ValueError, match="unknown setting 'zzz'; valid settings: range_rows"):
        DEFAULT.replace(zzz=1)


@pytest.mark.parametrize("bad,message", [
    (dict(sel_algo="blocks"), "sel_algo must be one of"),
    (dict(sel_dq_partial="bf16"), "sel_dq_partial must be one of"),
    (dict(range_fwd=(3, 2)), "range_fwd must be .num_warps, num_stages."),
    (dict(select=(4,)), "select must be .num_warps, num_stages."),
    (dict(dkdv_keys=8), "dkdv_keys must be a power of two >= 16"),
    (dict(select_rows=96), "select_rows must be a power of two >= 1"),
    (dict(sel_seg_rows=0), "sel_seg_rows must be a positive int"),
    (dict(split_bytes=True), "split_bytes must be a positive int"),
    (dict(sel_forced="yes"), "sel_forced must be True or False"),
])
def test_bad_values_are_refused_at_construction(bad, message):
    with pytest.raises(ValueError, match=message):
        LaunchConfig(**bad)


def test_defaults_replace_and_frozen():
    cfg = LaunchConfig()
    assert cfg == DEFAULT and cfg.changed() == {}
    assert {f.name: f.default for f in dataclasses.fields(LaunchConfig)} == cfg.to_dict()
    new = cfg.replace(sel_seg_rows=2048, range_fwd=[8, 3])  # a list (from YAML / CLI) becomes a tuple
    assert new.changed() == {"sel_seg_rows": 2048, "range_fwd": (8, 3)}
    assert new.warps("range_fwd") == {"num_warps": 8, "num_stages": 3}
    assert cfg.sel_seg_rows == 1024  # the original is untouched
    assert LaunchConfig.from_dict(new.to_dict()) == new and hash(new) == hash(LaunchConfig(**new.to_dict()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        new.sel_seg_rows = 1


def test_use_launch_scopes_the_config_of_new_geometries():
    pytest.importorskip("triton")
    import torch

    from nsa_dist import NSAConfig
    from nsa_dist.kernels.nsa import make_geometry

    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=3, window=8)
    q, kc = torch.zeros(1, 32, 2, 16), torch.zeros(1, 7, 1, 16)
    fast = LaunchConfig(range_rows=32, sel_algo="query")
    with use_launch(fast):
        assert current_launch() is fast
        geo = make_geometry(q, kc, kc, cfg, None)
        with use_launch(DEFAULT):
            assert make_geometry(q, kc, kc, cfg, None).launch is DEFAULT
        assert current_launch() is fast
    assert current_launch() is DEFAULT
    assert geo.launch is fast and geo.range_bt("fwd") == 16 and not geo.sel_block_major()
    assert make_geometry(q, kc, kc, cfg, None).launch is DEFAULT
    with pytest.raises(TypeError, match="takes a LaunchConfig"):
        with use_launch({"range_rows": 32}):
            pass

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
    (dict(range_rows=None), "range_rows must be a positive int"),  # None only where the field is Optional
    (dict(acc_regs=True), "acc_regs must be a positive int"),
    (dict(split_bytes=True), "split_bytes must be a positive int"),
    (dict(sel_forced="yes"), "sel_forced must be True or False"),
    (dict(overlap_branches=1), "overlap_branches must be True or False"),
    (dict(window_forced="yes"), r"window_forced must be True or False or None \(the automatic choice\)"),
    (dict(side_priority=1), "side_priority must be 0 .normal. or -1 .high."),
    (dict(sel_split_regs=300), "sel_split_regs must be None or an int 24-255"),
    (dict(range_cmp_fwd=(4, 0)), "range_cmp_fwd must be .num_warps, num_stages."),
    (dict(range_cmp_fwd_keys=24), "range_cmp_fwd_keys must be a power of two >= 16"),
    (dict(dkdv_programs=0), "dkdv_programs must be a positive int"),
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
    assert geo.launch is fast and geo.tiles("range_fwd").bt == 16 and not geo.sel_block_major()
    assert make_geometry(q, kc, kc, cfg, None).launch is DEFAULT
    with pytest.raises(TypeError, match="takes a LaunchConfig"):
        with use_launch({"range_rows": 32}):
            pass


def test_the_shared_memory_estimate_reproduces_the_reported_failure():
    """Issue 25: fp32, Dk = 192 (256 padded), the selection kernel at its defaults (128 rows,
    64 keys, 3 stages) asked Triton for 330752 B > 232448."""
    from nsa_dist.kernels.launch import SMEM_SLACK, smem_estimate

    assert smem_estimate("select", 128, 64, 256, 0, 4, 3) - SMEM_SLACK == 330752 - 3072
    assert smem_estimate("select", 128, 64, 256, 0, 4, 3) > DEFAULT.smem_bytes
    rows, keys, stages = DEFAULT.fit("select", 128, 64, 256, 0, 4, 3, fixed="keys")
    assert keys == 64 and smem_estimate("select", rows, keys, 256, 0, 4, stages) <= DEFAULT.smem_bytes
    assert (rows, stages) == (64, 2)


def _geometry(G, dk, dv, dtype, sel_block=64, launch=DEFAULT):
    pytest.importorskip("triton")
    import torch

    from nsa_dist.kernels import tiles
    from nsa_dist.kernels.nsa import Geometry

    lay = tiles.make_layout(torch.tensor([0, 8]), torch.tensor([0, 1]))
    return Geometry(lay, HQ=2 * G, H=2, DK=dk, DV=dv, dtype=dtype, sel_block=sel_block, launch=launch)


KERNELS = ("range_fwd", "range_cmp_fwd", "range_dq", "range_dkdv", "sel_fwd", "sel_dq", "sel_split", "sel_dq_split",
           "sel_dkdv", "sel_dkdv_dq")


@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
def test_every_head_dim_up_to_256_fits_shared_memory(dtype_name):
    """Every kernel's tiles, after fitting, are within smem_bytes for Dk, Dv up to 256 (also
    Dk != Dv), groups 1-16 and l' up to 64, in each dtype; G = 32 too at the largest dims."""
    import torch

    from nsa_dist.kernels.launch import smem_estimate

    dtype = getattr(torch, dtype_name)
    cases = [(G, dk, dv, ls) for G in (1, 2, 3, 4, 8, 16) for dk in (16, 64, 128, 192, 256)
             for dv in (16, 128, 192, 256) for ls in (16, 64)] + [(32, 256, 256, 64)]
    for G, dk, dv, ls in cases:
        geo = _geometry(G, dk, dv, dtype, ls)
        for kernel in KERNELS:
            t = geo.tiles(kernel)
            size = smem_estimate(kernel, t.block_m, t.block_n, geo.bdk(), geo.bdv(), dtype.itemsize,
                                 t.launch["num_stages"])
            assert size <= DEFAULT.smem_bytes, (G, dk, dv, ls, kernel, t)
            assert t.block_m >= 16 and t.block_n >= 16 and t.launch["num_stages"] >= 1
            if kernel in ("range_fwd", "range_cmp_fwd", "range_dq", "sel_fwd", "sel_dq"):
                assert t.bt >= 1 and t.bt * G <= t.block_m  # a program's rows fit its tile


@pytest.mark.parametrize("G", [1, 2, 4, 8, 16])
def test_16_bit_defaults_are_unchanged_up_to_dk_256_dv_128(G):
    """The fitting changes nothing where the defaults fit: 16-bit inputs, the paper's head dims
    and the seeds' (Dk = 192, Dv = 128), every kernel at the launch config's own tiles; the warps
    are the config's own but where acc_regs widens a kernel with large accumulators (Dk > 128)."""
    import torch

    off = DEFAULT.replace(acc_regs=None)
    for dk, dv in ((64, 64), (128, 128), (192, 128), (256, 128)):
        geo, plain = _geometry(G, dk, dv, torch.bfloat16), _geometry(G, dk, dv, torch.bfloat16, launch=off)
        for kernel in KERNELS:
            assert plain.tiles(kernel).launch == DEFAULT.warps(kernel), (dk, dv, kernel)
            assert geo.tiles(kernel)[:3] == plain.tiles(kernel)[:3], (dk, dv, kernel)
            if dk <= 128:
                assert geo.tiles(kernel).launch == DEFAULT.warps(kernel), (dk, dv, kernel)
        assert geo.tiles("range_fwd")[:3] == (max(1, 64 // G), max(16, 64 // G * G), 32)
        # the compressed forward: the range forward's rows and warps, its own 64 keys a step
        cmp, rng = geo.tiles("range_cmp_fwd"), geo.tiles("range_fwd")
        assert (cmp.bt, cmp.block_m, cmp.block_n, cmp.launch) == (rng.bt, rng.block_m, 64, rng.launch)
        assert geo.tiles("range_dkdv")[1:3] == (64, 64)
        assert geo.tiles("sel_dkdv").block_m == DEFAULT.sel_dkdv_rows == 32


def test_a_tile_that_cannot_fit_is_refused_by_name():
    with pytest.raises(ValueError, match="sel_dkdv: no tile fits 1024 B"):
        LaunchConfig(smem_bytes=1024).fit("sel_dkdv", 64, 64, 256, 256, 4, 3, fixed="keys")


def test_fp32_dots_follow_pytorch_matmul_precision():
    """fp32 inputs get full-precision dots unless PyTorch allows TF32; 16-bit ones are unaffected."""
    pytest.importorskip("triton")
    import torch

    from nsa_dist.kernels.nsa import dot_precision

    assert torch.get_float32_matmul_precision() == "highest"  # PyTorch's default, as the suite runs
    assert dot_precision(torch.float32) == "ieee" and dot_precision(torch.bfloat16) == "tf32"
    try:
        torch.set_float32_matmul_precision("high")
        assert dot_precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")


def test_every_matrix_product_of_the_kernels_takes_the_precision():
    """No tl.dot of the kernels falls back to Triton's default (TF32 for fp32 inputs)."""
    import os
    import re

    root = os.path.join(os.path.dirname(__file__), "..", "..", "kernels")
    dots = 0
    for name in ("range_attn.py", "selected_attn.py", "selection.py"):
        src = open(os.path.join(root, name)).read()
        for m in re.finditer(r"tl\.dot\(", src):
            depth, i = 0, m.end() - 1
            while True:
                depth += {"(": 1, ")": -1}.get(src[i], 0)
                if depth == 0:
                    break
                i += 1
            call = src[m.start():i + 1]
            dots += 1
            assert "input_precision=" in call, (name, call)
    assert dots >= 20


def test_acc_regs_doubles_the_warps_of_kernels_with_large_accumulators():
    """LaunchConfig.acc_regs (128 by default): a kernel whose fp32 accumulators exceed that many
    registers a thread gets twice the warps, up to 8. At the seeds' Dk = 192 (in pieces),
    Dv = 128 in bf16, 128 widens the three dK/dV kernels (160 registers at 4 warps) and
    nothing at the paper's D = 128; None changes nothing; 8 warps set stay 8."""
    import torch

    from nsa_dist.kernels.launch import ACC_TILES

    wide, off = LaunchConfig(acc_regs=128), LaunchConfig(acc_regs=None)
    assert DEFAULT.acc_regs == 128
    for G in (4, 16):
        seeds = _geometry(G, 192, 128, torch.bfloat16, launch=wide)
        paper = _geometry(G, 128, 128, torch.bfloat16)
        plain = _geometry(G, 192, 128, torch.bfloat16, launch=off)
        for kernel in KERNELS:
            want = 8 if kernel in ("range_dkdv", "sel_dkdv", "sel_dkdv_dq") else 4
            assert seeds.tiles(kernel).launch == {"num_warps": want, "num_stages": DEFAULT.warps(kernel)["num_stages"]}
            assert paper.tiles(kernel).launch == DEFAULT.warps(kernel), (G, kernel)
            assert plain.tiles(kernel).launch == DEFAULT.warps(kernel), (G, kernel)
            assert seeds.tiles(kernel)[:3] == plain.tiles(kernel)[:3]  # the tiles themselves are unchanged
    assert set(ACC_TILES) == set(KERNELS)
    assert LaunchConfig(acc_regs=1).acc_warps("range_fwd", 64, 32, 128, 128) == 8  # capped at 8
    assert LaunchConfig(acc_regs=128, sel_dkdv=(8, 3)).acc_warps("sel_dkdv", 64, 64, 128, 128) == 8
    with pytest.raises(ValueError, match="acc_regs must be a positive int"):
        LaunchConfig(acc_regs=0)

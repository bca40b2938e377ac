"""Pure helpers of the benchmark tools (no GPU needed)."""
import os
import re
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

    def fake_bench(name, S, rows, baselines=None):
        assert baselines == ()  # --ab times ours alone
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
    for grid in bench_selection.GRIDS.values():
        for vals in itertools.product(*grid.values()):
            LaunchConfig(**dict(zip(grid, vals)))


def test_bench_selection_builds_every_shape():
    """bench_selection's inputs for every bench_kernels shape (it once unpacked the shapes as
    plain tuples and failed only on the GPU): the heads, head dims and config of the shape,
    and the selection runs on them (CPU interpreter, 256 tokens, fp32)."""
    pytest.importorskip("triton")
    import torch

    import bench_selection
    from nsa_dist.kernels.nsa import _range_forward
    from nsa_dist.kernels.selection import select_from_lse

    for name, sh in bench_kernels.SHAPES.items():
        cfg, x, q, kc, geo, sc = bench_selection.shape_inputs(name, 256, torch.float32)
        assert q.shape == (256, sh.HQ, sh.DK) and x["v_sel"].shape[-1] == sh.DV, name
        assert (cfg.cmp_block, cfg.sel_block, cfg.window) == (sh.l, sh.ls, sh.w), name
        if name == "c_small_g":  # one shape through the kernels (the interpreter is slow)
            lse = _range_forward(0, q, kc, kc, geo, cfg, sc, lse_only=True)[1]
            idx = select_from_lse(q, kc, lse, geo, cfg, sc)
            assert idx.shape == (256, sh.H, cfg.num_selected) and int(idx.max()) >= 0


def test_bench_rows_hold_a_figure_or_a_note_for_every_comparison(monkeypatch, tmp_path):
    """--bench's row for a shape: ours timed, and every comparison either timed or named in
    ``notes`` with its reason (here on the CPU: no cuDNN, no peer, FLA refuses G = 2), never a
    crash; the CSV takes rows with different columns. Timing itself is stubbed (one call)."""
    import csv

    import torch

    calls = []

    def one_call(fn, grad_inputs=None):
        calls.append(fn)
        fn()
        return 1.0
    monkeypatch.setattr(bench_kernels, "_bench", one_call)
    monkeypatch.setitem(bench_kernels.SHAPES, "tiny", bench_kernels.Shape(4, 2, 32, 16, 8, 4, 16, 4, 16, False))
    monkeypatch.setitem(bench_kernels.SHAPES, "tiny_fla", bench_kernels.Shape(4, 2, 16, 16, 16, 16, 16, 3, 0, True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rows = []
    bench_kernels.bench_shape("tiny", 64, rows)
    bench_kernels.bench_shape("tiny_fla", 48, rows)
    for row in rows:
        assert row["nsa_fwd_ms"] == 1.0 and row["nsa_bwd_ms"] == 0.0 and row["nsa_select_ms"] == 1.0
        for name in ("dense_cudnn", "dense_flash", "dense_flash_attn", "peer"):
            assert f"{name}_fwd_ms" in row or f"{name}: " in row["notes"], (name, row["notes"])
        assert "peer: " in row["notes"]  # not importable here
        assert row["peer_branches"] == "compression, selection"  # no flash-attn: no window for either
    assert rows[0]["Dk"] == 32 and rows[0]["Dv"] == 16 and rows[0]["kv"] == "K/V per branch"
    assert "nsa_peerlike_fwd_ms" in rows[0]  # ours again with the peer's branches and one K/V
    assert "nsa_peerlike_fwd_ms" not in rows[1]  # (b)-like: ours already is
    assert "fla: FLA needs HQ / H a power of two >= 16, got 2" in rows[1]["notes"]
    path = tmp_path / "bench.csv"
    bench_kernels._write_csv(str(path), rows + [{"shape": "x", "S": 1, "notes": "failed: out of memory"}])
    with open(path) as fh:
        back = list(csv.DictReader(fh))
    assert [r["shape"] for r in back] == ["tiny", "tiny_fla", "x"] and back[2]["notes"] == "failed: out of memory"


def test_the_peer_loads_without_its_package_init_and_with_stand_ins(monkeypatch, tmp_path):
    """load_peer imports flash_nsa.modules.hf_level_nsa without running the package __init__
    files, gives a missing pandas a stand-in during the import only, and turns an import
    failure into Unavailable with the reason."""
    import torch

    import kernel_baselines as kb

    pkg = tmp_path / "flash_nsa"
    (pkg / "modules").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the package init must not run')\n")
    (pkg / "modules" / "__init__.py").write_text("raise ImportError('nor this one')\n")
    (pkg / "utils.py").write_text("VALUE = 7\n")
    (pkg / "modules" / "hf_level_nsa.py").write_text("import pandas as pd\nfrom ..utils import VALUE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    had_pandas = "pandas" in sys.modules
    try:
        hf = kb.load_peer()
        assert hf.VALUE == 7
        assert ("pandas" in sys.modules) == had_pandas  # the stand-in is gone after the import
        (pkg / "utils.py").write_text("raise RuntimeError('broken peer')\n")
        for m in [m for m in sys.modules if m.startswith("flash_nsa")]:
            del sys.modules[m]
        with pytest.raises(kb.Unavailable, match="broken peer"):
            kb.load_peer()
        assert not [m for m in sys.modules if m.startswith("flash_nsa")]
    finally:
        for m in [m for m in sys.modules if m.startswith("flash_nsa")]:
            del sys.modules[m]


def test_kernel_spills_types_and_a_bad_setting():
    """tools/kernel_spills.py: launch arguments map to Triton signature types; a bad launch
    setting ends the tool before any capture or compile."""
    import torch

    import kernel_spills

    assert kernel_spills._arg_type(torch.zeros(1, dtype=torch.bfloat16)) == "*bf16"
    assert kernel_spills._arg_type(torch.zeros(1, dtype=torch.int64)) == "*i64"
    assert kernel_spills._arg_type(3) == "i32" and kernel_spills._arg_type(1 << 40) == "i64"
    assert kernel_spills._arg_type(0.5) == "fp32" and kernel_spills._arg_type(True) == "i1"
    assert kernel_spills._arg_type(None) == "none"  # an unused optional argument (no TMA descriptor)
    rec = {"kernel": "_range_bwd_dkdv", "constexprs": {"MODE": 0, "BLOCK_M": 64, "BLOCK_N": 64, "G": 4}}
    assert kernel_spills._label(rec) == "_range_bwd_dkdv MODE=0 BLOCK_M=64 BLOCK_N=64"
    pytest.importorskip("triton")
    from triton.tools.tensor_descriptor import TensorDescriptor
    desc = TensorDescriptor.from_tensor(torch.zeros(64, 32, dtype=torch.bfloat16), [16, 32])
    assert kernel_spills._arg_type(desc) == "tensordesc<bf16[16,32]>"
    with pytest.raises(SystemExit, match="did you mean 'acc_regs'"):
        kernel_spills.main(["--settings", "acc_reg=128"])


KERNELS_G4 = ("_range_fwd", "_select_topn", "_sel_fwd_split", "_sel_combine", "_range_bwd_dq", "_range_bwd_dkdv",
              "_sel_bwd_dkdv", "_sel_bwd_dq_split", "_sel_dq_combine")


@pytest.mark.parametrize("group,settings,kernels", [
    # the 1b model's path: block-major selected kernels and their merges, the gate combination
    # in the merge and its backward in the range dq (``gate_fused``, ``gate_bwd_fused``)
    (4, "", KERNELS_G4),
    # the separate gate kernels (two streams take them) and the window's launch with the forced blocks
    pytest.param(4, "gate_fused=False,gate_bwd_fused=False,window_forced=True",
                 ("_combine_fwd", "_combine_bwd", "_range_fwd"), marks=pytest.mark.slow),
    pytest.param(16, "sel_tma=True", ("_sel_fwd", "_sel_bwd_dq", "_range_fwd"), marks=pytest.mark.slow)],
    ids=["g4", "g4-separate-gates", "g16-tma"])
def test_every_kernel_builds_for_hopper(group, settings, kernels):
    """Every kernel of a forward + backward compiles for sm_90a with the installed Triton: the
    interpreter runs code the compiler rejects (a loop-carried variable whose type changes in
    the loop ran on the CPU and failed on the GPU, 2026-12-07)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    tool = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "kernel_spills.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the tool compiles, in its own process
    run = subprocess.run([sys.executable, tool, "--group", str(group), "--dims", "128:128", "--settings", settings],
                         env=env, capture_output=True, text=True, timeout=900)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "failed" not in out, out[-3000:]
    for name in kernels:
        assert f"  {name}" in out, (name, out)


def test_kernel_spills_specializes_as_the_launcher_does():
    """Arguments are marked as Triton's launcher marks them on a GPU: ints divisible by 16 and
    16-byte-aligned addresses "D", ints equal to 1 constants; without that no tile load of the
    offline builds was vectorized or pipelined (docs/kernel_notes.md)."""
    import torch

    import kernel_spills

    assert [kernel_spills._arg_spec(v) for v in (128, 32, 0, 1, 4, 3, True, 0.5)] == ["D", "D", "D", "1", "", "",
                                                                                      "", ""]
    t = torch.zeros(64, dtype=torch.float32)
    assert kernel_spills._arg_spec(t) == ("D" if t.data_ptr() % 16 == 0 else "")
    assert kernel_spills._arg_spec(t[1:]) == ""  # 4 bytes past an aligned start


def test_ab_gain_compares_medians_of_the_first_shape(tmp_path, capsys):
    """tools/ab_gain.py: exit 0 only where the changed setting's fwd+bwd median beats the
    defaults' by the asked fraction; a file without timed rows is an error that says so."""
    import ab_gain

    path = tmp_path / "ab.csv"
    rows = ["shape,ab_label,nsa_fwd_ms,nsa_bwd_ms", "c,changed,10,40", "c,default,11,44", "c,changed,10,41",
            "c,default,11,45", "a,changed,1,1", "a,default,9,9"]
    path.write_text("\n".join(rows) + "\n")
    assert ab_gain.medians(str(path)) == ("c", 50.5, 55.5)
    assert ab_gain.main([str(path), "--min-gain", "0.05"]) == 0
    assert ab_gain.main([str(path), "--min-gain", "0.2"]) == 1
    assert "changed 50.50 ms, defaults 55.50 ms, 1.099x" in capsys.readouterr().out
    path.write_text("shape,ab_label,nsa_fwd_ms,nsa_bwd_ms\nc,default,1,2\n")
    with pytest.raises(SystemExit, match="no timed 'changed' row"):
        ab_gain.medians(str(path))
    with pytest.raises(SystemExit, match="no such file"):
        ab_gain.main([str(tmp_path / "missing.csv")])


def test_bench_kernels_launch_needs_ncu():
    with pytest.raises(SystemExit, match="add --ncu"):
        bench_kernels.main(["--launch", "sel_algo=block"])


def test_with_launch_refuses_a_bad_setting_before_the_module_runs():
    import with_launch

    with pytest.raises(SystemExit, match="did you mean 'sel_l2_hints'"):
        with_launch.main(["sel_l2_hint=True", "nsa_dist.training.bench", "--help"])
    with pytest.raises(SystemExit, match="usage"):
        with_launch.main(["sel_algo=block"])


@pytest.mark.slow
def test_kernel_spills_compiles_every_recorded_launch_for_hopper():
    """The whole tool on a small group (its own process: kernels imported under the interpreter
    cannot be compiled): every attention kernel of a forward + backward is recorded through the
    interpreter and compiled for sm_90a, with its registers reported."""
    import subprocess

    pytest.importorskip("triton")
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.abspath(root)
    run = subprocess.run([sys.executable, os.path.join(root, "tools", "kernel_spills.py"), "--group", "2", "--dims",
                          "32:32", "--settings", ""], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    for name in ("_range_fwd", "_range_bwd_dq", "_range_bwd_dkdv", "_sel_bwd_dkdv", "_select_topn"):
        assert re.search(rf"{name} .*: +\d+ registers, spills +\d+ / +\d+ B", out), (name, out)
    assert "failed" not in out


# ----------------------------------------------------------------------------- bench_decode
def test_bench_decode_launch_settings_and_their_errors():
    """--launch sets the base DecodeLaunch, --ab adds one setting per value (or one changing
    several fields), labelled by what differs from the defaults; duplicates are dropped; an
    unknown field, a wrong type, a value DecodeLaunch refuses or bad syntax is a clear error."""
    pytest.importorskip("triton")
    import bench_decode
    from nsa_dist.kernels.decode import DecodeLaunch

    assert bench_decode.launch_variants([], []) == []
    got = bench_decode.launch_variants(["block_k=32", "topk_merge=false"],
                                       ["block_n=32,64,128", "num_warps=8+block_k=64", "block_k=32"])
    base = DecodeLaunch(block_k=32, topk_merge=False)
    assert [launch for _, launch in got] == [base, DecodeLaunch(block_k=32, topk_merge=False, block_n=32),
                                            DecodeLaunch(block_k=32, topk_merge=False, block_n=128),
                                            DecodeLaunch(num_warps=8, topk_merge=False)]
    assert [label for label, _ in got] == ["block_k=32+topk_merge=False", "block_n=32+block_k=32+topk_merge=False",
                                           "block_n=128+block_k=32+topk_merge=False", "num_warps=8+topk_merge=False"]
    assert bench_decode.launch_variants([], ["block_n=64"]) == [("default", DecodeLaunch())]
    for launch, ab, match in ((["block_nn=32"], [], "unknown DecodeLaunch field 'block_nn'; did you mean 'block_n'"),
                              ([], ["block_n=lots"], "block_n takes an integer"),
                              ([], ["topk_merge=maybe"], "topk_merge takes true or false"),
                              ([], ["block_n=48"], "block_n must be a positive power of two"),
                              (["block_n"], [], "--launch takes KEY=VALUE"),
                              ([], ["block_n=32,64+block_k=16"], "a value list")):
        with pytest.raises(SystemExit, match=match):
            bench_decode.launch_variants(launch, ab)


def test_bench_decode_kernel_times_sum_launches_per_kernel_and_step():
    import bench_decode

    events = [("_cmp_split", 800.0), ("_select", 60.0), ("_cmp_split", 400.0),
              ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(int, T1, T2)", 3.0)]
    got = bench_decode.summarize_kernels(events, steps=2)
    assert got == {"_cmp_split": 600.0, "_select": 30.0, "vectorized_elementwise_kernel": 1.5}
    assert list(got) == ["_cmp_split", "_select", "vectorized_elementwise_kernel"]  # largest first
    assert bench_decode.kernel_column(got) == "_cmp_split=600.0;_select=30.0;vectorized_elementwise_kernel=1.5"


def test_bench_decode_refuses_kernel_settings_without_kernels(tmp_path):
    """--ab on the PyTorch path would time nothing it names: refused before any work."""
    pytest.importorskip("triton")
    import bench_decode

    with pytest.raises(SystemExit, match="use --nsa-backend triton"):
        bench_decode.main(["--nsa-backend", "reference", "--device", "cpu", "--ab", "block_n=32",
                           "--csv", str(tmp_path / "x.csv")])
    assert not (tmp_path / "x.csv").exists()


def test_bench_decode_writes_the_csv_after_every_row(monkeypatch, tmp_path):
    """A long A/B stopped midway keeps every row it timed: the CSV is rewritten after each row
    (the speedups of a point filled when its last row is in)."""
    import bench_decode

    monkeypatch.setitem(sys.modules, "flash_attn", None)
    real, sizes = bench_decode.write_csv, []
    monkeypatch.setattr(bench_decode, "write_csv", lambda rows, path: sizes.append(len(rows)) or real(rows, path))
    out = tmp_path / "b.csv"
    assert bench_decode.main(["--batches", "1", "--contexts", "256,512", "--device", "cpu", "--heads", "4",
                              "--kv-heads", "2", "--head-dim", "16", "--window", "64", "--num-selected", "4",
                              "--iters", "1", "--warmup", "0", "--csv", str(out)]) == 0
    # per point: nsa_pytorch, dense_sdpa, then the point's rewrite with its speedups
    assert sizes == [1, 2, 2, 3, 4, 4]
    assert out.read_text().count("\n") == 5


@pytest.mark.slow
def test_kernel_accesses_builds_every_launch_of_a_layer_for_hopper():
    """tools/kernel_accesses.py: every Triton launch of one layer forward + backward, built for
    sm_90 as a launch specialises it; the split kernel's stores are all vector stores."""
    import subprocess

    pytest.importorskip("triton")
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.abspath(root)
    run = subprocess.run([sys.executable, os.path.join(root, "tools", "kernel_accesses.py")], capture_output=True,
                         text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in run.stdout.splitlines()[1:]}
    for name in ("_split_cols", "_range_fwd", "_select_topn", "_sel_fwd_split", "_range_bwd_dkdv", "_sel_bwd_dkdv"):
        assert name in rows, (name, run.stdout)
    assert "failed" not in run.stdout
    loads, vloads, stores, vstores, _ = (int(v) for v in rows["_split_cols"])
    assert stores > 0 and vstores == stores and vloads > 0


def test_peer_kernel_build_specialises_as_the_launcher_and_refuses_bad_input(tmp_path):
    """tools/peer_kernel_build.py: the peer's launch record marks unit strides constant and
    addresses / row strides divisible by 16 (as kernel_spills does for ours); a missing peer
    and a malformed tile end the tool naming what to fix."""
    import peer_kernel_build as pkb

    class Fn:  # the peer kernel's argument names, as Triton's JITFunction lists them
        arg_names = ["Q", "K", "V", "O", "LSE", "X_CU_SEQLENS", "CP", "q_stride_n", "q_stride_d", "sm_scale",
                     "kernel_size", "D1", "D2", "VD", "BLOCK_N", "BLOCK_M"]
        __module__ = "peer_nsa.ops.compress_attn"

    rec = pkb.launch_record(Fn, 128, 64, 4, 2)
    assert rec["types"] == ["*bf16"] * 4 + ["*fp32", "*i32", "i32", "i32", "fp32", "i32"]
    assert rec["spec"] == ["D"] * 6 + ["D", "1", "", ""]
    assert rec["constexprs"] == dict(CP=False, D1=128, D2=0, VD=128, BLOCK_N=128, BLOCK_M=64, num_warps=4,
                                     num_stages=2)
    with pytest.raises(SystemExit, match="copy the peer's flash_nsa/ there"):
        pkb.main(["--peer", str(tmp_path)])
    with pytest.raises(SystemExit, match="rows:keys:warps:stages, four ints"):
        pkb.main(["--peer", str(tmp_path), "--tile", "128:64"])

"""The throughput grid (``nsa_dist.training.bench``) under the launchers, and its inputs.

The bench behind docs/scaling.md: every point is a real Trainer run on mock data with no
evaluation and no checkpoints; rank 0 appends one CSV row per point.
"""
import csv

import pytest
import yaml

from conftest import ROOT, TINY_MODEL, check, run_launcher
from nsa_dist.training.bench import _csv_ints, parse_layout


def _bench_yaml(tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text(yaml.safe_dump(TINY_MODEL))
    cfg = yaml.safe_load((ROOT / "configs/train/bench_1b.yaml").read_text())
    cfg.update(model=str(model), precision="fp32", train_steps=3, output_dir=str(tmp_path / "out"))
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# every dimension of the grid with two values by default; all four layouts with `-m slow`
@pytest.mark.parametrize("layouts", ["sp2,tp2:mb2", pytest.param("dp,tp2,sp2,tp2:mb2", marks=pytest.mark.slow)])
def test_grid_under_torchrun_writes_one_row_per_point(tmp_path, layouts):
    out = tmp_path / "grid" / "tput.csv"
    proc = run_launcher("torchrun.sh", _bench_yaml(tmp_path), "--seq-len", "128,256", "--layouts",
                        layouts, "--attention", "nsa,dense", "--out", str(out),
                        launcher_args=("--nproc", "2", "--entry", "nsa_dist.training.bench"))
    check(proc)
    rows = list(csv.DictReader(out.open()))
    names = layouts.split(",")
    assert len(rows) == 4 * len(names)
    assert {(r["layout"], r["attention"], r["seq_len"]) for r in rows} == {
        (lay, a, s) for lay in names for a in ("nsa", "dense") for s in ("128", "256")}
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["tokens_per_s_per_gpu"]) > 0 and float(r["seconds_per_step"]) > 0
        assert int(r["tp"]) * int(r["sp"]) * int(r["dp"]) == 2
        assert r["model"] == "model.yaml"  # the model YAML the grid ran (no overrides)
    by = {(r["layout"], r["attention"], r["seq_len"]): r for r in rows}
    assert by[("tp2:mb2", "nsa", "128")]["micro_batch_size"] == "2"
    assert by[("sp2", "nsa", "256")]["sp"] == "2" and by[("tp2:mb2", "dense", "256")]["tp"] == "2"
    if "dp" in names:
        assert by[("dp", "dense", "256")]["dp"] == "2"
    # no evaluation and no checkpoints were written for any point
    assert not list((tmp_path / "grid" / "runs").glob("*/checkpoints"))
    assert "[bench] nsa" in proc.stdout
    # nothing of a point (trainer, engine, optimizer, model) outlives it into the next point
    assert "still alive" not in proc.stdout + proc.stderr, proc.stdout[-2000:]


def test_bad_grid_arguments_fail_before_any_run(tmp_path):
    proc = run_launcher("torchrun.sh", _bench_yaml(tmp_path), "--layouts", "tp2x", "--out",
                        str(tmp_path / "t.csv"), launcher_args=("--nproc", "1", "--entry", "nsa_dist.training.bench"))
    assert proc.returncode != 0
    assert "layout 'tp2x'" in proc.stderr + proc.stdout
    assert not (tmp_path / "t.csv").exists()


def test_layout_and_length_parsing():
    assert parse_layout("tp2sp2").tp == 2 and parse_layout("tp2sp2").sp == 2
    assert parse_layout("sp4:mb3").micro_batch == 3 and parse_layout("dp").tp == 1
    assert _csv_ints("8k,65536,1024k", "seq-len") == [8192, 65536, 1048576]
    for bad in ("", "tp", "tp0", "dp2", "tp2:mb0", "pp2"):
        with pytest.raises(ValueError, match="layout"):
            parse_layout(bad)
    with pytest.raises(ValueError, match="seq-len"):
        _csv_ints("8k,abc", "seq-len")

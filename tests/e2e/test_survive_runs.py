"""Runs of nsa-pretrain that meet damage: a corrupt newest checkpoint (skipped, named,
replaced when its step comes again; TensorBoard keeps each step once; nsa-convert refuses
it) and a disk that fills up during a save (stops with status 74, previous checkpoint kept)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, _env, check, run_pretrain, summary, train_yaml
from nsa_dist.checkpoint import verify_checkpoint
from nsa_dist.training.exits import EXIT_SAVE_FAILED

pytest.importorskip("deepspeed")

MODEL_FILE = "mp_rank_00_model_states.pt"


def _flip_byte(path: Path, at: int = 2000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_newest_checkpoint_is_skipped_then_replaced(tiny_data, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nsa_dist.convert.cli import main as convert

    cfg = train_yaml(tiny_data, tmp_path, train_steps=4, save_every=2, image_every=0)
    check(run_pretrain(cfg))
    first = summary(cfg)
    ckpts = Path(first["checkpoint"]).parent
    _flip_byte(ckpts / "step_00000004" / MODEL_FILE)  # same size: only the checksum tells
    assert convert(["consolidate", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    assert f"{MODEL_FILE} fails its sha256 check" in capsys.readouterr().err
    proc = run_pretrain(cfg, "--resume", "auto")
    check(proc)
    assert "skipping unusable" in proc.stdout and MODEL_FILE in proc.stdout
    assert "step_00000002 (step 2" in proc.stdout and "replacing" in proc.stdout
    again = summary(cfg)
    assert again["checkpoint"] == first["checkpoint"]
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    verify_checkpoint(again["checkpoint"])  # the damaged folder was rewritten whole
    assert again["loss_curve"] == first["loss_curve"][2:]  # bit-exact continuation
    acc = EventAccumulator(first["tensorboard"], size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]  # replayed steps once


def test_disk_full_during_a_save_stops_and_keeps_the_previous(tiny_data, tmp_path):
    cfg = train_yaml(tiny_data, tmp_path, train_steps=6, save_every=2, image_every=0, tensorboard=False)
    cmd = [sys.executable, str(ROOT / "tests/e2e/faulty_pretrain.py"), "step_00000004", "--config", str(cfg)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_SAVE_FAILED, proc.stderr[-3000:]
    assert "could not write checkpoint" in proc.stderr and "No space left on device" in proc.stderr
    assert "step_00000002 is intact" in proc.stderr
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002"]
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert "[checkpoint] step 4" not in proc.stdout and "[done]" not in proc.stdout
    assert not (tmp_path / "run" / "summary.json").exists()
    check(run_pretrain(cfg, "--resume", "auto"))  # the disk has room again
    assert [s for s, _ in summary(cfg)["loss_curve"]] == [3, 4, 5, 6]
    assert json.loads((ckpts / "step_00000006" / "nsa_meta.json").read_text())["step"] == 6

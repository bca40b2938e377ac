"""The user's path through the trainer (issue 26): each test fails on the code before its fix."""
from __future__ import annotations

import json
import os

import pytest

from conftest import ROOT, _env, check, free_port, run_pretrain, shm_buffers, summary, train_yaml


# ------------------------------------------------------------------ defect 4: tokenizer differs from the shards'

def test_tokenizer_other_than_the_shards_is_refused(tiny_data, tmp_path):
    import json as json_pkg

    from nsa_dist.data.tokenizer import train_tokenizer

    other = tmp_path / "other_tokenizer"
    train_tokenizer([os.path.dirname(json_pkg.__file__)], 480, other, max_sentences=3000, log=lambda m: None)
    cfg = train_yaml(tiny_data, tmp_path, tokenizer=str(other), train_steps=1)
    proc = run_pretrain(cfg)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "data shards" in err and str(other) in err and tiny_data["tokenizer"] in err, err
    assert not os.path.exists(os.path.join(tmp_path, "run", "checkpoints"))


def _scalars(log_dir: str, tag: str) -> dict:
    """{step: value} of one TensorBoard scalar (the last value written for each step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


# ------------------------------------------------------------------ defects 5 and 11: schedule on resume, MFU

@pytest.mark.slow  # 14 s; exact resume stays in the default run (test_pretrain.py; 15-min budget)
def test_resume_with_more_steps_keeps_the_schedule_and_mfu_is_said(tiny_data, tmp_path):
    # 4 steps: warm-up 1, cosine 3e-3 -> 3e-4 over steps 1..4 (decay_steps 0: the rest of the run).
    base = dict(train_steps=4, warmup_steps=1, decay_steps=0, lr=3e-3, min_lr=3e-4, eval_batches=0,
                log_every=1, image_every=0)
    first = train_yaml(tiny_data, tmp_path / "a", peak_tflops=0.5, **base)
    proc = run_pretrain(first)
    check(proc)
    assert "[train] MFU (perf/mfu) against peak_tflops=0.5 TFLOP/s" in proc.stdout, proc.stdout
    tb = os.path.join(tmp_path / "a" / "run", "tensorboard")
    mfu, tflops = _scalars(tb, "perf/mfu"), _scalars(tb, "perf/tflops_per_gpu")
    assert sorted(mfu) == [1, 2, 3, 4] and all(abs(mfu[s] - tflops[s] / 0.5) < 1e-9 for s in mfu)
    assert "[schedule] warm-up 1 steps to 3.00e-03, cosine to 3.00e-04 until step 4" in proc.stdout

    # The same run resumed to 8 steps with the default (keep): min_lr past the old end.
    keep = train_yaml(tiny_data, tmp_path / "a", **{**base, "train_steps": 8})
    proc_keep = run_pretrain(keep, "--resume", "auto")
    check(proc_keep)
    assert "[schedule] schedule_on_resume=keep: the checkpoint's schedule continues" in proc_keep.stdout
    assert "[train] MFU not logged: no peak FLOP rate is known for cpu" in proc_keep.stdout
    lrs = _scalars(tb, "train/lr")  # TensorBoard step s logs the lr of optimizer step s - 1
    assert all(abs(lrs[s] - 3e-4) < 1e-9 for s in range(5, 9)), lrs
    assert summary(keep)["steps"] == 8
    meta = json.loads((tmp_path / "a" / "run" / "checkpoints" / "step_00000008" / "nsa_meta.json").read_text())
    assert meta["lr_schedule"] == {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "decay_steps": 3}


def _plan(meta: dict, **cfg):
    """plan_schedule of a run of ``cfg`` resuming a checkpoint of ``meta``: (schedule, printed lines)."""
    from types import SimpleNamespace

    from nsa_dist.training.config import TrainConfig
    from nsa_dist.training.resume import ResumePlan, plan_schedule

    lines = []
    env = SimpleNamespace(cfg=TrainConfig(**cfg), progress=SimpleNamespace(print=lines.append))
    return plan_schedule(env, ResumePlan("ckpt", meta) if meta else None), lines


def test_schedule_on_resume_keep_replan_and_chained_resumes():
    from nsa_dist.training.schedule import Schedule

    run = dict(lr=3e-3, min_lr=3e-4, warmup_steps=1, decay_steps=0)
    old_meta = {"step": 4, "train_config": {**run, "train_steps": 4}}  # before lr_schedule was recorded
    kept, lines = _plan(old_meta, **run, train_steps=8)
    assert kept == Schedule(3e-3, 3e-4, 1, 3) and kept(4) == kept(7) == 3e-4
    assert len(lines) == 1 and "schedule_on_resume=keep" in lines[0] and "lr 1.95e-03 instead of 3.00e-04" in lines[0]
    # A second resume (to 12) goes on with the recorded schedule, not with train_steps=8's.
    again, _ = _plan({"step": 8, "lr_schedule": kept.to_dict(), "train_config": {**run, "train_steps": 8}},
                     **run, train_steps=12)
    assert again == kept
    replanned, lines = _plan(old_meta, **run, train_steps=8, schedule_on_resume="replan")
    assert replanned == Schedule(3e-3, 3e-4, 1, 7) and replanned(4) > 1.5e-3
    assert "schedule_on_resume=replan" in lines[0] and "lr at step 4: 3.00e-04 -> 1.95e-03" in lines[0]
    same, lines = _plan({"step": 4, "lr_schedule": Schedule(3e-3, 3e-4, 1, 3).to_dict()}, **run, train_steps=4)
    assert same == kept and lines == ["[schedule] warm-up 1 steps to 3.00e-03, cosine to 3.00e-04 until step 4, "
                                      "then 3.00e-04 (as in the checkpoint)"]


def test_schedule_on_resume_is_validated():
    from nsa_dist.training.config import TrainConfig

    with pytest.raises(ValueError, match="schedule_on_resume='restart': must be one of"):
        TrainConfig(schedule_on_resume="restart")


# ------------------------------------------------------------------ defect 8: /dev/shm after a CPU run

def test_two_rank_cpu_run_leaves_nothing_in_dev_shm(tiny_data, tmp_path):
    import subprocess
    import sys

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    port = free_port()
    before = len(os.listdir("/dev/shm"))
    cfg = train_yaml(tiny_data, tmp_path, train_steps=2, eval_batches=0, image_every=0)
    env = {**_env(), "PYTHON": sys.executable}
    # Not run_launcher: it would clean up after the trainer.
    proc = subprocess.run(["bash", str(ROOT / "launch" / "deepspeed.sh"), "--nproc", "2", "--master-port", str(port),
                           str(cfg)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    left = shm_buffers(port)
    for path in left:  # whatever the outcome, leave nothing behind
        os.unlink(path)
    check(proc)
    assert left == [], f"the run left {left} in /dev/shm ({before} entries before it)"

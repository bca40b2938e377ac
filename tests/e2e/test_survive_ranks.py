"""Ranks that die, hang or are told to stop, on the CPU with gloo through launch/torchrun.sh:

- kill -9 of one of 2 ranks at a random step under --max-restarts: the job restarts, resumes
  by itself and ends with the loss and weights of an uninterrupted run, bit for bit;
- SIGTERM to the launcher (what Slurm does): both ranks finish the step, save it and exit
  with status 75; --resume auto continues bit-exactly; a second signal exits at once;
- a frozen rank without restarts: the other exits within 2 minutes naming it (status 76).
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, _env, check, run_pretrain, summary, train_yaml
from nsa_dist.checkpoint import verify_checkpoint
from nsa_dist.training.checkpoint import find_resume_checkpoint
from nsa_dist.training.exits import EXIT_PEER_LOST, EXIT_PREEMPTED
from procs import Launch, rank_pid

pytest.importorskip("deepspeed")

STEPS = 10


def launcher_env() -> dict:
    env = _env()
    env["PYTHON"] = sys.executable
    env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def torchrun(cfg: Path, *args: str, launcher_args: tuple = ()) -> Launch:
    return Launch(["bash", str(ROOT / "launch/torchrun.sh"), "--nproc", "2", *launcher_args, str(cfg), *args],
                  launcher_env(), ROOT)


def final_weights(s: dict) -> dict:
    path = Path(s["checkpoint"]) / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def assert_same_run(done: dict, reference: dict) -> None:
    """``done`` (a resumed run's summary) ends exactly where ``reference`` does."""
    assert done["steps"] == reference["steps"]
    tail = dict(reference["loss_curve"])
    assert done["loss_curve"] and all(loss == tail[step] for step, loss in done["loss_curve"]), \
        (done["loss_curve"], reference["loss_curve"])
    a, b = final_weights(done), final_weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final weights differ"


def _cfg(tiny_data, where: Path, **over) -> Path:
    fields = dict(train_steps=STEPS, save_every=3, log_every=1, image_every=0, eval_batches=0, tensorboard=False)
    return train_yaml(tiny_data, where, **{**fields, **over})


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> dict:
    """The uninterrupted 2-rank run."""
    cfg = _cfg(tiny_data, tmp_path_factory.mktemp("reference"))
    launch = torchrun(cfg)
    assert launch.wait(600) == 0, launch.output[-4000:]
    return summary(cfg)


@pytest.mark.slow  # timing-dependent: a kill that lands in the last steps' teardown failed once in a clean-clone run
def test_kill9_of_a_rank_restarts_and_matches_the_uninterrupted_run(tiny_data, tmp_path, reference):
    cfg = _cfg(tiny_data, tmp_path)
    kill_at = random.Random().randint(2, STEPS - 4)  # leave steps after the kill: the restart must resume
    launch = torchrun(cfg, launcher_args=("--max-restarts", "2"))
    try:
        launch.wait_for(rf"step {kill_at}/{STEPS}", 300)
        victim = rank_pid(launch.proc.pid, 1)
        assert victim, "no rank-1 worker found"
        os.kill(victim, signal.SIGKILL)
        rc = launch.wait(600)
    finally:
        launch.kill()
    out = launch.output
    assert rc == 0, f"killed at step {kill_at}; exit {rc}\n{out[-5000:]}"
    assert "[resume] loaded" in out, out[-3000:]
    assert_same_run(summary(cfg), reference)


def test_sigterm_saves_the_step_and_resumes_exactly(tiny_data, tmp_path, reference):
    cfg = _cfg(tiny_data, tmp_path)
    launch = torchrun(cfg, launcher_args=("--grace", "120"))
    try:
        step = int(launch.wait_for(r"step ([4-8])/", 300).group(1))
        os.kill(launch.proc.pid, signal.SIGTERM)  # the torchrun agent, as Slurm would
        launch.wait(300)
    finally:
        launch.kill()
    out = launch.output
    stopped = int(launch.wait_for(r"\[stop\] SIGTERM at step (\d+)", 1).group(1))
    assert stopped >= step and f"exiting with status {EXIT_PREEMPTED}" in out
    assert out.count("[stop] SIGTERM: finishing this step") == 2, out[-3000:]  # both ranks got it
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{stopped:08d}"
    resumed = torchrun(cfg, "--resume", "auto")
    assert resumed.wait(600) == 0, resumed.output[-4000:]
    assert summary(cfg)["loss_curve"][0][0] == stopped + 1
    assert_same_run(summary(cfg), reference)


@pytest.mark.slow  # 16 s; SIGTERM's checkpoint-and-resume stays in the default run (15-min budget)
def test_a_signal_stops_with_status_75_and_a_second_exits_at_once(tiny_data, tmp_path):
    # 16 micro-batches a step: the first signal's step must outlast the test's reaction to its
    # message (in a clean-clone run on 2 loaded cores the run had saved and exited before the
    # second signal came)
    cfg = _cfg(tiny_data, tmp_path, train_steps=200, save_every=0, grad_accum_steps=16)
    cmd = [sys.executable, "-m", "nsa_dist.training", "--config", str(cfg)]
    launch = Launch(cmd, _env(), ROOT)  # one process, no launcher: its own status
    try:
        launch.wait_for(r"step 2/", 300)
        os.kill(launch.proc.pid, signal.SIGUSR1)
        rc = launch.wait(120)
    finally:
        launch.kill()
    assert rc == EXIT_PREEMPTED, launch.output[-3000:]
    stopped = int(launch.wait_for(r"\[stop\] SIGUSR1 at step (\d+)", 1).group(1))
    verify_checkpoint(str(tmp_path / "run" / "checkpoints" / f"step_{stopped:08d}"))
    launch = Launch(cmd + ["--resume", "auto"], _env(), ROOT)
    try:
        launch.wait_for(rf"step {stopped + 2}/", 300)
        os.kill(launch.proc.pid, signal.SIGINT)
        launch.wait_for(r"\[stop\] SIGINT:", 60)  # the handler ran: the next one is the second
        os.kill(launch.proc.pid, signal.SIGINT)
        rc = launch.wait(60)
    finally:
        launch.kill()
    assert rc == -signal.SIGINT, launch.output[-3000:]
    assert "[done]" not in launch.output
    # Killed wherever it was (perhaps inside the save the first signal asked for): still resumable.
    found = find_resume_checkpoint("auto", str(tmp_path / "run" / "checkpoints"), warn=lambda m: None)
    assert found is not None and verify_checkpoint(found)["step"] >= stopped


def test_a_frozen_rank_is_named_within_two_minutes(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path, train_steps=200, save_every=0, collective_timeout_s=10)
    launch = torchrun(cfg, launcher_args=("--grace", "5"))
    try:
        launch.wait_for(r"step 3/", 300)
        victim = rank_pid(launch.proc.pid, 1)
        os.kill(victim, signal.SIGSTOP)
        frozen = time.monotonic()
        launch.wait_for(r"stopped answering", 120)
        named = time.monotonic() - frozen
        # torchrun now stops the job: SIGTERM to the frozen rank, then SIGKILL after its own
        # fixed 30 s on this path (not --grace). Once that teardown has begun, the kill is
        # done here: the job ends as torchrun would end it, without the 30 s wait.
        launch.wait_for(r"Sending process \d+ closing signal SIGTERM", 60)
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
        launch.wait(60)
    finally:
        launch.kill()
    out = launch.output
    assert named < 120 and "rank 1 stopped answering" in out and "collective_timeout_s=10" in out, out[-3000:]
    assert "[peers] rank 0: rank 1 has not been heard from" in out  # said before the timeout
    assert "--resume auto" in out
    assert f"exitcode  : {EXIT_PEER_LOST}" in out or f"exitcode: {EXIT_PEER_LOST}" in out, out[-3000:]

"""A 2-node job on one machine over 127.0.0.1: two launcher invocations (node ranks 0 and 1,
one CPU rank each), through launch/torchrun.sh and through the DeepSpeed launcher's no-ssh
mode; each trains, checkpoints, and resumes as a 2-node job."""
from __future__ import annotations

import os
import signal

import pytest

from conftest import ROOT, free_port, summary, train_yaml
from procs import Launch, rank_pid
from test_survive_ranks import launcher_env

pytest.importorskip("deepspeed")


def _two_nodes(script: str, cfg, node_args, *args: str) -> list:
    """Both nodes of one job; fails with their output unless both exit 0."""
    port = str(free_port())
    launches = [Launch(["bash", str(ROOT / "launch" / script), *node_args(rank), "--master-addr", "127.0.0.1",
                        "--master-port", port, str(cfg), *args], launcher_env(), ROOT) for rank in (0, 1)]
    try:
        codes = [launch.wait(600) for launch in launches]
    finally:
        for launch in launches:
            launch.kill()
    assert codes == [0, 0], "\n=====\n".join(launch.output[-3000:] for launch in launches)
    return launches


def _train_and_resume(script: str, cfg, node_args) -> None:
    first = _two_nodes(script, cfg, node_args)
    s = summary(cfg)
    assert s["ranks"] == 2 and [step for step, _ in s["loss_curve"]] == [1, 2, 3, 4]
    assert "step 4/4" in first[0].output and "step 4/4" not in first[1].output  # rank 0 reports
    second = _two_nodes(script, cfg, node_args, "--resume", "auto", "train_steps=6")
    assert "[resume] loaded" in second[0].output
    s = summary(cfg)
    assert s["ranks"] == 2 and [step for step, _ in s["loss_curve"]] == [5, 6]
    assert s["checkpoint"].endswith("step_00000006")


def _cfg(tiny_data, tmp_path):
    return train_yaml(tiny_data, tmp_path, train_steps=4, save_every=2, eval_batches=0, image_every=0,
                      tensorboard=False)


def test_two_nodes_through_torchrun(tiny_data, tmp_path):
    _train_and_resume("torchrun.sh", _cfg(tiny_data, tmp_path),
                      lambda rank: ("--nproc", "1", "--nnodes", "2", "--node-rank", str(rank)))


@pytest.mark.slow  # the torchrun one above runs by default; together they take over a minute
def test_two_nodes_through_the_deepspeed_launcher(tiny_data, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    _train_and_resume("deepspeed.sh", _cfg(tiny_data, tmp_path),
                      lambda rank: ("--hostfile", str(hostfile), "--node-rank", str(rank)))




@pytest.mark.slow
def test_two_nodes_restart_after_a_kill(tiny_data, tmp_path):
    """kill -9 of the rank on node 1: both nodes' torchrun restart their ranks, which resume."""
    cfg = train_yaml(tiny_data, tmp_path, train_steps=8, save_every=2, log_every=1, eval_batches=0,
                     image_every=0, tensorboard=False)
    port = str(free_port())
    launches = [Launch(["bash", str(ROOT / "launch/torchrun.sh"), "--nproc", "1", "--nnodes", "2",
                        "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port,
                        "--max-restarts", "2", str(cfg)], launcher_env(), ROOT) for rank in (0, 1)]
    try:
        launches[0].wait_for(r"step 4/8", 400)
        victim = rank_pid(launches[1].proc.pid, 1) or rank_pid(launches[0].proc.pid, 1)
        os.kill(victim, signal.SIGKILL)
        codes = [launch.wait(600) for launch in launches]
    finally:
        for launch in launches:
            launch.kill()
    outputs = [launch.output for launch in launches]
    assert codes == [0, 0], "\n=====\n".join(out[-3000:] for out in outputs)
    assert any("[resume] loaded" in out for out in outputs)
    assert summary(cfg)["steps"] == 8

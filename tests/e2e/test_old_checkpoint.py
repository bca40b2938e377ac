"""Checkpoints written before the one-model restructuring still resume and convert.

Until commit 71efc1b a tensor-parallel run trained twin classes (``ParallelDecoderLM``,
``ParallelNSAAttention``) whose parameters had other names (``layers.0.attn.q_proj``,
``layers.0.attn.gate_fc1_w``) and another order than the single-device model. The test
checks that commit's code out of the repository's history, trains a TP=2 ZeRO-2 run with it
(checkpoints at steps 2 and 4), then, with today's code:

- resumes its step-2 checkpoint and continues the old run's loss curve (steps 3, 4): the
  module weights are renamed through the checkpoint's own layout record and Adam's flat
  ZeRO buffers are read in the order they were written;
- consolidates its step-4 checkpoint to the same tensors as the old code's consolidate.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import _env, check, free_port, summary, train_yaml

ROOT = Path(__file__).parents[2]
OLD = "71efc1b"  # the last commit with the twin parallel classes
COMMON = dict(train_steps=4, decay_steps=10, eval_batches=0, image_every=0, tensorboard=False, log_every=1,
              save_every=2, deepspeed=str(ROOT / "configs/deepspeed/zero2.json"), parallel={"tp": 2})


def _old_tree(dest: Path) -> Path:
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{OLD}^{{commit}}"],
                      capture_output=True).returncode != 0:
        pytest.skip(f"commit {OLD} is not in this clone's history (a shallow clone?): fetch it to run this test")
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", OLD, "nsa_dist", "kernels", "launch"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _run(code_root: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = _env()
    env["PYTHONPATH"] = str(code_root)
    env["PYTHON"] = sys.executable
    env["MASTER_PORT"] = str(free_port())
    return subprocess.run(list(cmd), cwd=code_root, env=env, capture_output=True, text=True, timeout=600)


def _consolidate(code_root: Path, src: Path, out: Path) -> dict:
    check(_run(code_root, sys.executable, "-c",
               "import sys; from nsa_dist.convert.cli import main; sys.exit(main(sys.argv[1:]))",
               "consolidate", str(src), str(out), "--quiet"))
    from safetensors.torch import load_file
    return load_file(str(out / "model.safetensors"))


def test_checkpoint_of_the_twin_classes_resumes_and_consolidates(tiny_data, tmp_path):
    old = _old_tree(tmp_path / "old_code")
    old_cfg = train_yaml(tiny_data, tmp_path / "old_run", **COMMON)
    check(_run(old, "bash", str(old / "launch" / "torchrun.sh"), "--nproc", "2", str(old_cfg)))
    ckpts = tmp_path / "old_run" / "run" / "checkpoints"
    meta = json.loads((ckpts / "step_00000002" / "nsa_meta.json").read_text())
    assert any(name.endswith("attn.gate_fc1_w") for name in meta["param_layout"][0]), "not a twin-class checkpoint"

    new_cfg = train_yaml(tiny_data, tmp_path / "new_run", **COMMON)
    check(_run(ROOT, "bash", str(ROOT / "launch" / "torchrun.sh"), "--nproc", "2", str(new_cfg),
               "--resume", str(ckpts / "step_00000002")))
    want = {int(s): loss for s, loss in summary(old_cfg)["loss_curve"]}
    got = {int(s): loss for s, loss in summary(new_cfg)["loss_curve"]}
    assert sorted(got) == [3, 4], got
    err = max(abs(got[s] - want[s]) for s in got)
    print(f"old TP=2 checkpoint resumed by today's code: max |loss - old curve| {err:.2e}")
    assert err < 1e-5, (got, want)

    old_full = _consolidate(old, ckpts / "step_00000004", tmp_path / "cons_old")
    new_full = _consolidate(ROOT, ckpts / "step_00000004", tmp_path / "cons_new")
    assert old_full.keys() == new_full.keys()
    assert all(torch.equal(old_full[k], new_full[k]) for k in old_full)

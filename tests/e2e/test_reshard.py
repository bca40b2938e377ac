"""nsa-convert reshard and ZeRO-3 consolidate on real training checkpoints.

A TP=2 run saves at step 3 and goes on to step 6. Its step-3 checkpoint is resharded into a
layout-free checkpoint and resumed on one rank (TP=1, ZeRO-2), on four ranks (TP=4 > KV
heads, ZeRO-2) and on two ZeRO-3 data-parallel ranks: all continue the TP=2 run's loss curve, because Adam's moments are cut for the
new layout exactly like the weights. With --reset-optimizer the curve departs.
"""
import json
from pathlib import Path

import pytest
import torch

from conftest import check, run_launcher, summary, train_yaml
from nsa_dist.convert.cli import main as convert
from nsa_dist.convert.io import load_consolidated
from nsa_dist.convert.reshard import load_full

ROOT = Path(__file__).parents[2]
ZERO2 = str(ROOT / "configs/deepspeed/zero2.json")
ZERO3 = str(ROOT / "configs/deepspeed/zero3.json")
COMMON = dict(train_steps=6, decay_steps=10, eval_batches=0, image_every=0, tensorboard=False, log_every=1)


def _launch(cfg, nproc, *args):
    return run_launcher("torchrun.sh", cfg, *args, launcher_args=("--nproc", str(nproc)))


def _curve(cfg):
    return dict((int(s), loss) for s, loss in summary(cfg)["loss_curve"])


@pytest.fixture(scope="module")
def tp2_run(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    ref = train_yaml(tiny_data, root / "ref", deepspeed=ZERO2, save_every=3, parallel={"tp": 2}, **COMMON)
    check(_launch(ref, 2))
    step3 = root / "ref" / "run" / "checkpoints" / "step_00000003"
    assert convert(["reshard", str(step3), str(root / "full"), "--tp", "4", "--world-size", "4"]) == 0
    return root, ref, step3


def test_reshard_tp2_to_tp1_and_tp4_continues_the_loss_curve(tiny_data, tp2_run, capsys):
    root, ref, step3 = tp2_run
    want = _curve(ref)
    # Weights: the resharded file equals the consolidated checkpoint exactly.
    assert convert(["consolidate", str(step3), str(root / "cons")]) == 0
    _, cons = load_consolidated(str(root / "cons"))
    weights, avg, avg_sq = load_full(str(root / "full" / "step_00000003"))
    assert set(weights) <= set(cons) and all(torch.equal(weights[k], cons[k]) for k in weights)
    assert avg is not None and float(sum(v.abs().sum() for v in avg_sq.values())) > 0
    meta = json.loads((root / "full" / "step_00000003" / "nsa_meta.json").read_text())
    assert meta["layout"] == "full" and meta["optimizer"] == "adam" and meta["step"] == 3

    one = train_yaml(tiny_data, root / "one", deepspeed=ZERO2, **COMMON)
    proc = _launch(one, 1, "--resume", str(root / "full"))
    check(proc)
    got = _curve(one)
    assert sorted(got) == [4, 5, 6]
    for s in got:
        assert abs(got[s] - want[s]) < 1e-5, (s, got[s], want[s])

    four = train_yaml(tiny_data, root / "four", deepspeed=ZERO2, parallel={"tp": 4}, **COMMON)
    check(_launch(four, 4, "--resume", str(root / "full")))
    got4 = _curve(four)
    for s in (4, 5, 6):
        assert abs(got4[s] - want[s]) < 1e-4, (s, got4[s], want[s])

    # ZeRO-3 over 2 data-parallel ranks, micro-batch 1: the same samples per step (the loss
    # is then a mean of per-sample means, so it agrees to rounding of token counts only).
    z3 = train_yaml(tiny_data, root / "z3", deepspeed=ZERO3, micro_batch_size=1, **COMMON)
    check(_launch(z3, 2, "--resume", str(root / "full")))
    got3 = _curve(z3)
    for s in (4, 5, 6):
        assert abs(got3[s] - want[s]) < 2e-2, (s, got3[s], want[s])

    # Without the optimizer state the same weights train differently after one step.
    assert convert(["reshard", str(step3), str(root / "reset"), "--reset-optimizer"]) == 0
    reset = train_yaml(tiny_data, root / "reset_run", deepspeed=ZERO2, **COMMON)
    proc = _launch(reset, 1, "--resume", str(root / "reset"))
    check(proc)
    assert "RESET" in proc.stdout + proc.stderr
    got_r = _curve(reset)
    assert abs(got_r[4] - want[4]) < 1e-5  # same weights
    assert abs(got_r[6] - want[6]) > 1e-4  # Adam started afresh


def test_reshard_bad_input_is_refused(tiny_data, tp2_run, tmp_path, capsys):
    root, ref, step3 = tp2_run
    # a layout the model cannot take: named before anything is written
    assert convert(["reshard", str(step3), str(tmp_path / "x"), "--tp", "3"]) == 2
    assert "not divisible by tp*sp" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # an existing output is kept unless --force
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "f").write_text("mine")
    assert convert(["reshard", str(step3), str(tmp_path / "keep")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "keep" / "f").read_text() == "mine"
    # a consolidated model has no optimizer state: asked for explicitly
    assert convert(["consolidate", str(step3), str(tmp_path / "cons")]) == 0
    assert convert(["reshard", str(tmp_path / "cons"), str(tmp_path / "y")]) == 2
    assert "--reset-optimizer" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert convert(["reshard", str(tmp_path / "cons"), str(tmp_path / "y"), "--reset-optimizer"]) == 0
    # a ZeRO checkpoint resumed on another layout without reshard names the fix
    other = train_yaml(tiny_data, tmp_path / "other", deepspeed=ZERO2, **COMMON)
    proc = _launch(other, 1, "--resume", str(step3))
    assert proc.returncode != 0 and "nsa-convert reshard" in proc.stderr
    # another model config cannot load the resharded weights
    wide = json.loads(json.dumps(yaml_model(tiny_data)))
    wide["hidden_size"] = 96
    (tmp_path / "wide.yaml").write_text(json.dumps(wide))
    bad = train_yaml(tiny_data, tmp_path / "bad", deepspeed=ZERO2, model=str(tmp_path / "wide.yaml"), **COMMON)
    proc = _launch(bad, 1, "--resume", str(root / "full"))
    assert proc.returncode != 0 and "model config differs" in proc.stderr
    # a truncated shard
    bad_src = tmp_path / "trunc"
    import shutil
    shutil.copytree(step3, bad_src)
    shard = next(bad_src.glob("zero_pp_rank_0_mp_rank_01_optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:2000])
    assert convert(["reshard", str(bad_src), str(tmp_path / "z")]) == 2
    assert "truncated" in capsys.readouterr().err and not (tmp_path / "z").exists()


def yaml_model(tiny_data):
    import yaml
    return yaml.safe_load(Path(tiny_data["model"]).read_text())


def test_zero3_consolidate_equals_deepspeed_zero_to_fp32(tiny_data, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg = train_yaml(tiny_data, tmp_path / "z3", deepspeed=ZERO3, **dict(COMMON, train_steps=2))
    check(_launch(cfg, 2))
    ckpt = Path(summary(cfg)["checkpoint"])
    assert convert(["consolidate", str(ckpt), str(tmp_path / "c")]) == 0
    _, ours = load_consolidated(str(tmp_path / "c"))
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    assert set(ours) <= set(theirs) and len(ours) >= len(theirs) - 1  # tied lm_head stored once
    for k, v in ours.items():
        assert torch.equal(v, theirs[k].contiguous().float()), k


def test_zero3_with_tensor_parallel_is_refused_clearly(tiny_data, tmp_path):
    cfg = train_yaml(tiny_data, tmp_path / "z3tp", deepspeed=ZERO3, parallel={"tp": 2}, **COMMON)
    proc = _launch(cfg, 2)
    assert proc.returncode != 0 and "ZeRO-3" in proc.stderr and "not supported" in proc.stderr
    assert not (tmp_path / "z3tp" / "run" / "checkpoints").exists()

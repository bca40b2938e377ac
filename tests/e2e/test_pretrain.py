"""End-to-end runs of nsa-pretrain on the CPU: exact resume, 2-rank DeepSpeed launcher with
ZeRO-2 and ZeRO-3, TensorBoard tags, and clear errors for bad input."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import check, free_port, run_launcher, run_pretrain, summary, train_yaml

pytest.importorskip("deepspeed")
pytest.importorskip("sentencepiece")

EXPECTED_TAGS = [
    "train/loss", "train/lr", "train/grad_norm", "eval/loss", "perf/tokens_per_s_per_gpu",
    "perf/tflops_per_gpu", "mem/max_rss_gb",
    *[f"nsa/layer{i}/{kind}_{b}" for i in (0, 1) for kind in ("gate_mean", "gate_std", "tokens_read")
      for b in ("cmp", "sel", "win")],
]


def event_tags(log_dir: str) -> tuple[set, set, dict]:
    """(scalar tags, image tags, {tag: [values]}) read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    values = {t: [e.value for e in acc.Scalars(t)] for t in tags["scalars"]}
    return set(tags["scalars"]), set(tags["images"]), values


@pytest.fixture(scope="module")
def resumed_runs(tiny_data, tmp_path_factory):
    """The same 6 steps straight, and as 3 steps + resume (--resume auto) to 6."""
    base = tmp_path_factory.mktemp("resume")
    straight = train_yaml(tiny_data, base / "straight", save_every=3)
    check(run_pretrain(straight))
    split = train_yaml(tiny_data, base / "split", train_steps=3)
    first = run_pretrain(split)
    check(first)
    second = run_pretrain(split, "--resume", "auto", "train_steps=6")
    check(second)
    return {"straight": straight, "split": split, "second": second}


def test_resume_is_exact(resumed_runs):
    full = summary(resumed_runs["straight"])["loss_curve"]
    rest = summary(resumed_runs["split"])["loss_curve"]
    assert [s for s, _ in full] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in rest] == [4, 5, 6]
    assert [l for _, l in rest] == [l for _, l in full[3:]], "resumed losses differ from the straight run"
    assert "[resume] loaded" in resumed_runs["second"].stdout


def test_checkpoint_metadata(resumed_runs, tiny_data):
    import json

    out = Path(summary(resumed_runs["straight"])["checkpoint"])
    assert (out.parent / "latest").read_text().strip() == out.name == "step_00000006"
    meta = json.loads((out / "nsa_meta.json").read_text())
    assert meta["consumed_samples"] == 12 and meta["step"] == 6
    assert meta["tokenizer_sha256"] and meta["tokenizer_path"].endswith("tokenizer.model")
    assert meta["model_config"]["hidden_size"] == 64
    assert "rng_rank00000.pt" in meta["files"]


def test_truncated_checkpoint_is_a_clear_error(resumed_runs, tmp_path):
    src = Path(summary(resumed_runs["straight"])["checkpoint"])
    bad = tmp_path / "step_00000006"
    shutil.copytree(src, bad)
    states = bad / "mp_rank_00_model_states.pt"
    with open(states, "r+b") as fh:
        fh.truncate(os.path.getsize(states) // 2)
    proc = run_pretrain(resumed_runs["straight"], "--resume", str(bad))
    assert proc.returncode == 2
    assert "truncated" in proc.stderr and "mp_rank_00_model_states.pt" in proc.stderr


def test_missing_checkpoint_is_a_clear_error(resumed_runs, tmp_path):
    proc = run_pretrain(resumed_runs["straight"], "--resume", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "no such checkpoint" in proc.stderr


def test_config_typo_is_a_clear_error(tiny_data, tmp_path):
    cfg = train_yaml(tiny_data, tmp_path, train_stpes=3)
    proc = run_pretrain(cfg)
    assert proc.returncode == 2
    assert "unknown key 'train_stpes'" in proc.stderr and "train_steps" in proc.stderr


def test_shard_not_matching_its_index_is_a_clear_error(tiny_data, tmp_path):
    prefix = tmp_path / "corpus"
    for split in ("train", "valid"):
        for ext in ("bin", "idx"):
            shutil.copy(f"{tiny_data['prefix']}_{split}.{ext}", f"{prefix}_{split}.{ext}")
    with open(f"{prefix}_train.bin", "r+b") as fh:
        fh.truncate(os.path.getsize(f"{prefix}_train.bin") - 2)
    proc = run_pretrain(train_yaml(tiny_data, tmp_path, data_prefix=str(prefix)))
    assert proc.returncode == 2 and "do not match" in proc.stderr


def test_batch_size_mismatch_with_deepspeed_json(tiny_data, tmp_path):
    import json

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1}}))
    proc = run_pretrain(train_yaml(tiny_data, tmp_path, deepspeed=str(ds)))
    assert proc.returncode == 2
    assert "train_micro_batch_size_per_gpu=4 disagrees" in proc.stderr


def test_zero0_with_grad_accumulation(tiny_data, tmp_path):
    """ZeRO-0 (DeepSpeed reports no grad norm there: the trainer computes it) with 2
    micro-batches per step: the global batch counts both."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = train_yaml(tiny_data, tmp_path, train_steps=3, grad_accum_steps=2, log_every=1,
                     deepspeed=str(Path(__file__).parents[2] / "configs/deepspeed/zero0.json"))
    check(run_pretrain(cfg))
    s = summary(cfg)
    assert s["tokens_seen"] == 3 * 2 * 2 * 128
    acc = EventAccumulator(s["tensorboard"])
    acc.Reload()
    norms = [e.value for e in acc.Scalars("train/grad_norm")]
    assert len(norms) == 3 and all(n > 0 for n in norms)


# ZeRO-3 over 2 ranks also trains by default in test_reshard.py (z3_run, torchrun)
@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_two_ranks_deepspeed_launcher(tiny_data, tmp_path, stage):
    cfg = train_yaml(tiny_data, tmp_path, train_steps=12, eval_every=6, save_every=6, log_every=3,
                     image_every=6, deepspeed=str(Path(__file__).parents[2] / f"configs/deepspeed/zero{stage}.json"))
    proc = run_launcher("deepspeed.sh", cfg, launcher_args=("--nproc", "2", "--master-port", str(free_port())))
    check(proc)
    s = summary(cfg)
    assert s["ranks"] == 2 and s["zero_stage"] == stage and s["steps"] == 12
    losses = [l for _, l in s["loss_curve"]]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, f"loss did not fall: {losses}"
    assert s["eval_loss"] < s["eval_curve"][0][1] + 1e-6
    scalars, images, values = event_tags(s["tensorboard"])
    missing = [t for t in EXPECTED_TAGS if t not in scalars]
    assert not missing, f"missing tags {missing}; have {sorted(scalars)}"
    assert "perf/mfu" not in scalars  # CPU without a configured peak: MFU is n/a
    assert "nsa/selected_blocks/layer0" in images
    assert len(values["train/loss"]) == 12
    assert (Path(s["checkpoint"]).parent / "latest").read_text().strip() == "step_00000012"
    # rank 1 stays quiet: one progress line per logged step
    assert proc.stdout.count("step 12/12") == 1


@pytest.mark.slow
def test_torchrun_launcher_resumes_zero3(tiny_data, tmp_path):
    cfg = train_yaml(tiny_data, tmp_path, train_steps=4, save_every=2,
                     deepspeed=str(Path(__file__).parents[2] / "configs/deepspeed/zero3.json"))
    check(run_launcher("torchrun.sh", cfg, launcher_args=("--nproc", "2")))
    check(run_launcher("torchrun.sh", cfg, "--resume", "auto", "train_steps=6", launcher_args=("--nproc", "2")))
    assert [s for s, _ in summary(cfg)["loss_curve"]] == [5, 6]


def test_tensor_parallel_run_follows_single_rank(one_and_tp2_runs):
    """parallel.tp=2 through the launcher (2 ranks, DP=1) trains the same model as one rank."""
    one, tp = one_and_tp2_runs
    a, b = summary(one), summary(tp)
    assert b["ranks"] == 2 and [s for s, _ in a["loss_curve"]] == [s for s, _ in b["loss_curve"]]
    for (_, la), (_, lb) in zip(a["loss_curve"], b["loss_curve"]):
        assert abs(la - lb) < 1e-3, (a["loss_curve"], b["loss_curve"])
    scalars, _, _ = event_tags(b["tensorboard"])
    assert any(t.startswith("comm/") for t in scalars), sorted(scalars)

"""Train config, LR schedule, DeepSpeed JSON reconciliation, metrics, progress, and the
TensorBoard writer (read back with TensorBoard's reader): the fast parts of the trainer."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from nsa_dist.training.config import TrainConfig
from nsa_dist.training.ds_config import load_ds_json, resolve_ds_config
from nsa_dist.training.metrics import device_peak_tflops, step_rate
from nsa_dist.training.progress import Progress
from nsa_dist.training.schedule import lr_at, schedule_from_config

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_train_configs_load():
    for path in sorted((ROOT / "configs/train").glob("*.yaml")):
        cfg = TrainConfig.from_yaml(path)
        assert (ROOT / cfg.model).is_file() and (ROOT / cfg.deepspeed).is_file(), path


def test_config_typo_names_the_key_and_suggestion(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("micro_batch_sise: 4\n")
    with pytest.raises(ValueError, match=r"unknown key 'micro_batch_sise'; did you mean 'micro_batch_size'"):
        TrainConfig.from_yaml(p)


@pytest.mark.parametrize("field,value,msg", [
    ("seq_len", 0, "positive integer"), ("min_lr", 1.0, "min_lr"), ("precision", "fp16", "precision"),
    ("betas", [0.9], "betas"), ("eval_every", -1, ">= 0"), ("tensorboard", "yes", "true or false"),
    ("collective_timeout_s", 1, "collective_timeout_s"), ("collective_timeout_s", "x", "must be a number"),
])
def test_config_rejects_bad_values(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**{field: value})


def test_overrides():
    cfg = TrainConfig().apply_overrides(["train_steps=7", "lr=1e-3", "tensorboard=false"])
    assert (cfg.train_steps, cfg.lr, cfg.tensorboard) == (7, 1e-3, False)
    with pytest.raises(ValueError, match="did you mean 'train_steps'"):
        TrainConfig().apply_overrides(["train_step=7"])
    with pytest.raises(ValueError, match="key=value"):
        TrainConfig().apply_overrides(["train_steps"])


def test_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 0.1, 4, 10) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and math.isclose(lrs[9], 0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[14] == lrs[19] == pytest.approx(0.1)
    f = schedule_from_config(TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, train_steps=10))
    assert f(0) == 1.0 and f(10) == pytest.approx(0.0)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_shipped_ds_json_resolves(stage):
    cfg = TrainConfig(micro_batch_size=3, grad_accum_steps=2, grad_clip=0.5)
    ds = resolve_ds_config(load_ds_json(str(ROOT / f"configs/deepspeed/zero{stage}.json")), cfg, 4, "fp32")
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and ds["zero_optimization"]["stage"] == stage
    assert resolve_ds_config(ds | {"bf16": {"enabled": "auto"}}, cfg, 4, "bf16")["bf16"]["enabled"] is True


def test_ds_json_disagreements(tmp_path):
    cfg = TrainConfig(micro_batch_size=2, grad_accum_steps=1)
    with pytest.raises(ValueError, match=r"train_batch_size=8 disagrees with the train config \(4\)"):
        resolve_ds_config({"train_batch_size": 8}, cfg, 2, "fp32")
    with pytest.raises(ValueError, match="remove the 'optimizer' section"):
        resolve_ds_config({"optimizer": {"type": "Adam"}}, cfg, 2, "fp32")
    with pytest.raises(ValueError, match="bf16.enabled=True disagrees"):
        resolve_ds_config({"bf16": {"enabled": True}}, cfg, 2, "fp32")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_ds_json(str(bad))
    with pytest.raises(FileNotFoundError):
        load_ds_json(str(tmp_path / "none.json"))


def test_precision_rule():
    assert TrainConfig().resolved_precision("cpu", False) == "fp32"
    assert TrainConfig().resolved_precision("cuda", True) == "bf16"
    assert TrainConfig(precision="fp32").resolved_precision("cuda", True) == "fp32"


def test_rates_and_peaks():
    r = step_rate(tokens=1000, seconds=2.0, flops_per_token=6e9, peak_tflops=6.0)
    assert (r.tokens_per_s, r.tflops, r.mfu) == (500.0, 3.0, 0.5)
    assert step_rate(1000, 2.0, 6e9, None).mfu is None
    assert device_peak_tflops(torch.device("cpu"), "fp32") is None
    assert device_peak_tflops(torch.device("cpu"), "fp32", config_peak=2.5) == 2.5


def test_progress_only_rank0_prints():
    out0, out1 = io.StringIO(), io.StringIO()
    p0, p1 = Progress(10, 0, stream=out0), Progress(10, 1, stream=out1)
    for p in (p0, p1):
        p.start(0)
        p.update(5, 2.5, 1234.0)
        p.print("hello")
    assert "step 5/10 loss 2.5000 tok/s 1,234 ETA" in out0.getvalue() and "hello" in out0.getvalue()
    assert out1.getvalue() == ""
    out = io.StringIO()
    p = Progress(10, 1, log_all_ranks=True, stream=out)
    p.print("x")
    assert out.getvalue() == "[rank 1] x\n"


def test_selected_blocks_image():
    from nsa_dist.training.tensorboard import selected_blocks_image

    sel = torch.tensor([[0, -1], [0, 1], [0, 1], [1, 2]])  # S=4, l'=1... use l'=2 below
    img = selected_blocks_image(sel, sel_block=2, min_width=3)
    assert img.dtype.name == "uint8" and img.shape == (4, 3)  # 3 blocks, width >= 3
    assert img[0, 0] == 255 and img[0, 1] == 0  # block 1 is in query 0's future
    assert img[3, 2] == 255 and img[3, 0] == 70  # visible but not selected: grey


def test_tensorboard_writer_tags(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nsa_dist.modules import AttentionStats
    from nsa_dist.training.tensorboard import TBLogger

    tb = TBLogger(str(tmp_path))
    st = AttentionStats(gate_mean=torch.tensor([0.5, 0.4, 0.3]), gate_std=torch.tensor([0.1, 0.1, 0.1]),
                        tokens_read=torch.tensor([3.0, 40.0, 32.0]),
                        selected_blocks=torch.tensor([[0, -1], [0, 1]] * 32))
    tb.scalars({"train/loss": 2.0, "perf/mfu": None}, 1)
    tb.attention_stats([st, st], 1)
    tb.blocks_image(st.selected_blocks, 32, 0, 1)
    tb.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "nsa/layer1/gate_mean_win", "nsa/layer0/tokens_read_sel"} <= scalars
    assert "perf/mfu" not in scalars
    assert acc.Scalars("nsa/layer0/tokens_read_sel")[0].value == 40.0
    assert acc.Tags()["images"] == ["nsa/selected_blocks/layer0"]
    assert TBLogger(str(tmp_path / "off"), enabled=False).writer is None


def test_import_training_is_light():
    import subprocess
    import sys

    code = ("import sys, nsa_dist.training, nsa_dist.training.config;"
            "print(any(m in sys.modules for m in ('deepspeed', 'tensorboard', 'sentencepiece')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False", out.stderr
    json.dumps({})


def test_batches_keep_cu_seqlens_on_the_host():
    """The attention reads the document offsets on the host: the trainer leaves them on the
    CPU (a device copy would cost a GPU sync in every layer) and drops them for one document."""
    from nsa_dist.training.loop import to_device

    meta = torch.device("meta")
    ids = torch.zeros(1, 8, dtype=torch.int64)
    packed = {"input_ids": ids, "labels": ids, "cu_seqlens": torch.tensor([0, 3, 8], dtype=torch.int32)}
    out = to_device(packed, meta)
    assert out["input_ids"].device.type == "meta" and out["cu_seqlens"] is packed["cu_seqlens"]
    one = dict(packed, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    assert to_device(one, meta)["cu_seqlens"] is None

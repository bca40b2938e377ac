"""Context parallel training through the real trainer and launcher (CPU, gloo): a CP=2 run
follows the single-rank run, its checkpoint consolidates to the same model as one device,
reshards for TP=2 and resumes there on the CP=2 run's curve; bad CP layouts are refused
before any process group is built."""
import json
from pathlib import Path

import pytest
import torch

from conftest import check, run_launcher, run_pretrain, summary, train_yaml
from nsa_dist.checkpoint import load_full
from nsa_dist.convert.cli import main as convert
from nsa_dist.convert.io import load_consolidated
from nsa_dist.models import NSADecoderLM

ROOT = Path(__file__).parents[2]
ZERO1 = str(ROOT / "configs/deepspeed/zero1.json")
ZERO3 = str(ROOT / "configs/deepspeed/zero3.json")
COMMON = dict(train_steps=4, decay_steps=10, eval_batches=0, image_every=0, tensorboard=False, log_every=1,
              deepspeed=ZERO1)


def _curve(cfg):
    return dict((int(s), loss) for s, loss in summary(cfg)["loss_curve"])


def _model(folder):
    cfg, state = load_consolidated(str(folder))
    model = NSADecoderLM(cfg, backend="reference").eval()
    model.load_state_dict(state, strict=not cfg.tie_embeddings)
    return model


@pytest.mark.slow
def test_cp2_training_consolidates_to_one_device_and_reshards_to_tp2(tiny_data, tmp_path):
    one = train_yaml(tiny_data, tmp_path / "one", **COMMON)
    check(run_pretrain(one))
    cp = train_yaml(tiny_data, tmp_path / "cp", save_every=2, parallel={"cp": 2}, **COMMON)
    proc = run_launcher("torchrun.sh", cp, launcher_args=("--nproc", "2"))
    check(proc)
    s = summary(cp)
    assert s["layout"] == {"tp": 1, "sp": 1, "cp": 2, "dp": 1}
    a, b = _curve(one), _curve(cp)
    err = max(abs(a[k] - b[k]) for k in a)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and err < 1e-4, (a, b)

    ck = Path(s["checkpoint"])
    meta = json.loads((ck / "nsa_meta.json").read_text())
    assert meta["train_config"]["parallel"]["cp"] == 2 and len(meta["param_layout"]) == 1
    assert convert(["consolidate", str(tmp_path / "one" / "run"), str(tmp_path / "c_one")]) == 0
    assert convert(["consolidate", str(tmp_path / "cp" / "run"), str(tmp_path / "c_cp")]) == 0
    x = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = _model(tmp_path / "c_one")(x).logits, _model(tmp_path / "c_cp")(x).logits
    assert (la - lb).abs().max() < 1e-3 * la.abs().max()  # the same 4 AdamW steps

    # step 2 of the CP=2 run -> layout-free -> resumed under TP=2 continues the CP=2 curve
    step2 = ck.parent / "step_00000002"
    assert convert(["reshard", str(step2), str(tmp_path / "tp" / "run" / "checkpoints"), "--tp", "2"]) == 0
    w, _, _ = load_full(str(tmp_path / "tp" / "run" / "checkpoints" / "step_00000002"))
    assert convert(["consolidate", str(step2), str(tmp_path / "c_step2")]) == 0
    _, cons = load_consolidated(str(tmp_path / "c_step2"))
    assert all(torch.equal(w[k], cons[k]) for k in w)
    tp = train_yaml(tiny_data, tmp_path / "tp", parallel={"tp": 2}, **COMMON)
    proc = run_launcher("torchrun.sh", tp, "--resume", "auto", launcher_args=("--nproc", "2"))
    check(proc)
    got = _curve(tp)
    assert sorted(got) == [3, 4] and max(abs(got[k] - b[k]) for k in got) < 1e-4, (got, b)


@pytest.mark.slow
def test_bad_cp_layouts_are_refused_before_any_group(tiny_data, tmp_path):
    cases = [(dict(parallel={"cp": 2}, seq_len=126), "2*cp = 4 equal chunks; use a multiple of 4"),
             (dict(parallel={"cp": 2}, deepspeed=ZERO3), "context parallel (cp=2) with ZeRO-3"),
             (dict(parallel={"cp": 3}), "not divisible by tp*sp*cp")]
    for i, (over, words) in enumerate(cases):
        kw = {**COMMON, **over}
        cfg = train_yaml(tiny_data, tmp_path / f"bad{i}", **kw)
        proc = run_launcher("torchrun.sh", cfg, launcher_args=("--nproc", "2"))
        assert proc.returncode != 0 and words in proc.stdout + proc.stderr, (words, proc.stderr[-3000:])

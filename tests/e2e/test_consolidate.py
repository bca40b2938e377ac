"""nsa-convert consolidate on real training checkpoints (1 rank and TP=2 under the launcher)."""
import json
from pathlib import Path

import torch

from conftest import check, free_port, run_launcher, run_pretrain, summary, train_yaml
from nsa_dist.convert.cli import main as convert
from nsa_dist.convert.io import load_consolidated
from nsa_dist.models import NSADecoderLM

ZERO1 = str(Path(__file__).parents[2] / "configs/deepspeed/zero1.json")


def _consolidated_model(run_dir, out):
    assert convert(["consolidate", str(run_dir), str(out)]) == 0
    cfg, state = load_consolidated(str(out))
    model = NSADecoderLM(cfg, backend="reference").eval()
    model.load_state_dict(state, strict=not cfg.tie_embeddings)
    return model


def test_consolidate_tp2_matches_single_rank_training(tiny_data, tmp_path, capsys):
    one = train_yaml(tiny_data, tmp_path / "one", deepspeed=ZERO1, train_steps=3)
    check(run_pretrain(one))
    tp = train_yaml(tiny_data, tmp_path / "tp", deepspeed=ZERO1, train_steps=3, parallel={"tp": 2})
    check(run_launcher("deepspeed.sh", tp, launcher_args=("--nproc", "2", "--master-port", str(free_port()))))
    meta = json.loads((Path(summary(tp)["checkpoint"]) / "nsa_meta.json").read_text())
    assert len(meta["param_layout"]) == 2
    a = _consolidated_model(tmp_path / "one" / "run", tmp_path / "c_one")
    b = _consolidated_model(tmp_path / "tp" / "run", tmp_path / "c_tp")
    assert (tmp_path / "c_tp" / "tokenizer.model").exists()
    x = torch.randint(0, 512, (1, 64))
    with torch.no_grad():
        la, lb = a(x).logits, b(x).logits
    # The same 3 optimizer steps on one rank and on two TP ranks give the same model.
    assert (la - lb).abs().max() < 1e-3 * la.abs().max()
    # Bad input: existing output, a damaged checkpoint, a non-checkpoint.
    assert convert(["consolidate", str(tmp_path / "one" / "run"), str(tmp_path / "c_one")]) == 2
    assert "already exists" in capsys.readouterr().err
    states = next(Path(summary(one)["checkpoint"]).glob("mp_rank_00_model_states.pt"))
    states.write_bytes(states.read_bytes()[:1000])
    assert convert(["consolidate", str(tmp_path / "one" / "run"), str(tmp_path / "c_bad")]) == 2
    assert "truncated" in capsys.readouterr().err and not (tmp_path / "c_bad").exists()
    assert convert(["consolidate", str(tmp_path), str(tmp_path / "c_none")]) == 2
    assert "no nsa_dist checkpoint" in capsys.readouterr().err

"""nsa-convert consolidate on real training checkpoints (1 rank and TP=2 under the launcher)."""
import json
import shutil
from pathlib import Path

import torch

from conftest import summary
from nsa_dist.convert.cli import main as convert
from nsa_dist.convert.io import load_consolidated
from nsa_dist.models import NSADecoderLM


def _consolidated_model(run_dir, out):
    assert convert(["consolidate", str(run_dir), str(out)]) == 0
    cfg, state = load_consolidated(str(out))
    model = NSADecoderLM(cfg, backend="reference").eval()
    model.load_state_dict(state, strict=not cfg.tie_embeddings)
    return model


def test_consolidate_tp2_matches_single_rank_training(one_and_tp2_runs, tmp_path, capsys):
    one, tp = one_and_tp2_runs
    meta = json.loads((Path(summary(tp)["checkpoint"]) / "nsa_meta.json").read_text())
    assert len(meta["param_layout"]) == 2
    a = _consolidated_model(one.parent / "run", tmp_path / "c_one")
    b = _consolidated_model(tp.parent / "run", tmp_path / "c_tp")
    assert (tmp_path / "c_tp" / "tokenizer.model").exists()
    x = torch.randint(0, 512, (1, 64))
    with torch.no_grad():
        la, lb = a(x).logits, b(x).logits
    # The same 6 optimizer steps on one rank and on two TP ranks give the same model.
    assert (la - lb).abs().max() < 1e-3 * la.abs().max()
    # Bad input: existing output, a damaged checkpoint (of a copy: the runs are shared), a non-checkpoint.
    copy = tmp_path / "one" / "run"
    shutil.copytree(one.parent / "run", copy)
    assert convert(["consolidate", str(copy), str(tmp_path / "c_one")]) == 2
    assert "already exists" in capsys.readouterr().err
    states = copy / "checkpoints" / Path(summary(one)["checkpoint"]).name / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    assert convert(["consolidate", str(copy), str(tmp_path / "c_bad")]) == 2
    assert "truncated" in capsys.readouterr().err and not (tmp_path / "c_bad").exists()
    assert convert(["consolidate", str(tmp_path), str(tmp_path / "c_none")]) == 2
    assert "no nsa_dist checkpoint" in capsys.readouterr().err

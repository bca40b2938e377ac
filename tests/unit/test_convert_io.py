"""nsa-convert's file helpers: progress display, Adam moment files (nsa_dist.checkpoint),
consolidated checks."""
import io
import sys

import pytest
import torch

from nsa_dist import ModelConfig
from nsa_dist.checkpoint import OPTIMIZER
from nsa_dist.checkpoint.tensors import load_moments, save_moments
from nsa_dist.convert import io as cio
from nsa_dist.convert.consolidate import check_against_model, global_batch
from nsa_dist.models import NSADecoderLM


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_only_on_a_terminal_and_not_quiet(monkeypatch):
    items = list(range(5))
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file: nothing, the list itself
    assert cio.progress(items, "reading", quiet=False) is items
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert cio.progress(items, "reading", quiet=True) is items
    assert list(cio.progress(items, "reading shards")) == items  # tqdm bar
    assert "[nsa-convert] reading shards" in tty.getvalue()
    monkeypatch.setitem(sys.modules, "tqdm", None)  # without tqdm: plain lines
    tty.truncate(0)
    assert list(cio.progress(items, "reading shards")) == items
    assert "reading shards: 0/5" in tty.getvalue() and "reading shards: done" in tty.getvalue()


def test_moments_file_round_trip_and_bad_files(tmp_path):
    a = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    b = {k: v.abs() for k, v in a.items()}
    path = str(tmp_path / OPTIMIZER)
    save_moments(a, b, ["w", "b"], path)
    got_a, got_b = load_moments(path)
    assert all(torch.equal(got_a[k], a[k]) and torch.equal(got_b[k], b[k]) for k in a)
    from safetensors.torch import save_file
    save_file({"exp_avg.w": a["w"]}, path)  # no matching exp_avg_sq
    with pytest.raises(ValueError, match="not an Adam moments file"):
        load_moments(path)
    (tmp_path / "t.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="truncated"):
        load_moments(str(tmp_path / "t.safetensors"))


def test_check_against_model_names_shape_and_dtype():
    cfg = ModelConfig.from_yaml("configs/model/tiny.yaml")
    state = NSADecoderLM(cfg).state_dict()
    check_against_model(dict(state), cfg)
    bad = dict(state, **{"norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"norm.weight: checkpoint shape \(3,\)"):
        check_against_model(bad, cfg)
    bad = dict(state, **{"norm.weight": state["norm.weight"].long()})
    with pytest.raises(ValueError, match="norm.weight: dtype torch.int64"):
        check_against_model(bad, cfg)
    bad = {k: v for k, v in state.items() if k != "layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match="missing.*layers.1.mlp.up_proj.weight"):
        check_against_model(bad, cfg)


def test_global_batch_from_metadata():
    tc = {"micro_batch_size": 2, "grad_accum_steps": 3, "parallel": {"tp": 2, "sp": 2}}
    assert global_batch({"train_config": tc, "world_size": 8}) == 2 * 3 * 2
    assert global_batch({"global_batch": 5}) == 5
    assert global_batch({}) is None

"""Checkpoint bookkeeping without DeepSpeed: a fake engine writes the files, so the atomic
``latest`` marker, interrupted saves, truncation checks and pruning are tested fast."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from nsa_dist.checkpoint import LATEST_FILE, META_FILE, verify_checkpoint
from nsa_dist.training.checkpoint import CheckpointManager, check_compatible, find_resume_checkpoint


class FakeEngine:
    """Writes one file per save like DeepSpeed would; can fail halfway through."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.loaded = None

    def save_checkpoint(self, root, tag, save_latest):
        assert save_latest is False
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        with open(os.path.join(root, tag, "mp_rank_00_model_states.pt"), "wb") as fh:
            fh.write(b"x" * 100)
            if self.fail:
                raise KeyboardInterrupt("killed during save")

    def load_checkpoint(self, root, tag, **kwargs):
        self.loaded = (root, tag)
        return os.path.join(root, tag), {}


def manager(root, keep=0):
    return CheckpointManager(str(root), rank=0, world_size=1, barrier=lambda: None, keep=keep)


def test_save_writes_meta_then_latest(tmp_path):
    path = manager(tmp_path).save(FakeEngine(), 5, {"consumed_samples": 10})
    assert (tmp_path / LATEST_FILE).read_text().strip() == "step_00000005"
    meta = verify_checkpoint(path)
    assert meta["consumed_samples"] == 10 and meta["step"] == 5
    assert meta["files"]["mp_rank_00_model_states.pt"] == 100
    assert "rng_rank00000.pt" in meta["files"]


def test_interrupted_save_leaves_previous_loadable(tmp_path):
    m = manager(tmp_path)
    m.save(FakeEngine(), 5, {})
    with pytest.raises(KeyboardInterrupt):
        m.save(FakeEngine(fail=True), 10, {})
    assert (tmp_path / "step_00000010").is_dir()  # partial folder left behind
    assert (tmp_path / LATEST_FILE).read_text().strip() == "step_00000005"
    found = find_resume_checkpoint("auto", str(tmp_path))
    assert found == str(tmp_path / "step_00000005")
    engine = FakeEngine()
    assert m.load(engine, found)["step"] == 5 and engine.loaded[1] == "step_00000005"
    with pytest.raises(ValueError, match="incomplete"):
        find_resume_checkpoint(str(tmp_path / "step_00000010"), str(tmp_path))
    m.save(FakeEngine(), 10, {})  # a later save of that step replaces the leftover
    assert find_resume_checkpoint("auto", str(tmp_path)).endswith("step_00000010")


def test_truncated_file_is_detected_and_auto_falls_back(tmp_path):
    m = manager(tmp_path)
    m.save(FakeEngine(), 1, {})
    m.save(FakeEngine(), 2, {})
    with open(tmp_path / "step_00000002" / "mp_rank_00_model_states.pt", "r+b") as fh:
        fh.truncate(40)
    with pytest.raises(ValueError, match=r"truncated.*mp_rank_00_model_states.pt has 40 bytes"):
        verify_checkpoint(str(tmp_path / "step_00000002"))
    warnings = []
    found = find_resume_checkpoint("auto", str(tmp_path), warn=warnings.append)
    assert found.endswith("step_00000001") and "unusable" in warnings[0]


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        find_resume_checkpoint(str(tmp_path / "absent"), str(tmp_path))
    assert find_resume_checkpoint("auto", str(tmp_path / "empty")) is None
    assert find_resume_checkpoint(None, str(tmp_path)) is None
    path = manager(tmp_path).save(FakeEngine(), 3, {})
    os.remove(os.path.join(path, "rng_rank00000.pt"))
    with pytest.raises(FileNotFoundError, match="missing rng_rank00000.pt"):
        verify_checkpoint(path)
    with open(os.path.join(path, META_FILE), "w") as fh:
        fh.write("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        verify_checkpoint(path)


def test_resume_from_root_follows_latest(tmp_path):
    m = manager(tmp_path)
    m.save(FakeEngine(), 4, {})
    assert find_resume_checkpoint(str(tmp_path), str(tmp_path / "other")).endswith("step_00000004")


def test_prune_keeps_newest_complete(tmp_path):
    m = manager(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        m.save(FakeEngine(), step, {})
    assert sorted(os.listdir(tmp_path)) == [LATEST_FILE, "step_00000003", "step_00000004"]


def test_resaving_a_complete_step_keeps_it(tmp_path):
    m = manager(tmp_path)
    path = m.save(FakeEngine(), 7, {"mark": 1})
    assert m.save(FakeEngine(fail=True), 7, {"mark": 2}) == path  # not rewritten
    assert verify_checkpoint(path)["mark"] == 1


def test_rng_states_restored(tmp_path):
    m = manager(tmp_path)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = m.save(FakeEngine(), 1, {})
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    m.load(FakeEngine(), path)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


def test_check_compatible():
    meta = {"tag": "step_1", "model_config": {"a": 1}, "tokenizer_sha256": "ab" * 32,
            "seq_len": 128, "world_size": 2, "data_prefix": "d"}
    assert check_compatible(meta, {"a": 1}, "ab" * 32, "d", 128, 2) == []
    with pytest.raises(ValueError, match=r"model config differs in \['a'\]"):
        check_compatible(meta, {"a": 2}, "ab" * 32, "d", 128, 2)
    with pytest.raises(ValueError, match="tokenizer differs"):
        check_compatible(meta, {"a": 1}, "cd" * 32, "d", 128, 2)
    with pytest.raises(ValueError, match="data-parallel size differs"):
        check_compatible(meta, {"a": 1}, "ab" * 32, "d", 128, 4)
    assert "data_prefix changed" in check_compatible(meta, {"a": 1}, "ab" * 32, "e", 128, 2)[0]
    json.dumps(meta)


def test_execution_settings_do_not_block_a_resume():
    """fused_projection / recompute change how the model is computed, not what: a checkpoint
    written without them (older versions) or with other values resumes; a change is reported."""
    meta = {"tag": "step_1", "model_config": {"a": 1}, "tokenizer_sha256": "ab" * 32,
            "seq_len": 128, "world_size": 2, "data_prefix": "d"}
    now = {"a": 1, "fused_projection": True, "recompute": "keep_attention"}
    assert check_compatible(meta, now, "ab" * 32, "d", 128, 2) == []
    meta["model_config"] = {"a": 1, "fused_projection": False, "recompute": "full"}
    (warning,) = check_compatible(meta, now, "ab" * 32, "d", 128, 2)
    assert "fused_projection False -> True" in warning and "recompute 'full' -> 'keep_attention'" in warning
    with pytest.raises(ValueError, match=r"model config differs in \['a'\]"):
        check_compatible(meta, {**now, "a": 2}, "ab" * 32, "d", 128, 2)

"""Checkpoint integrity and failed writes, fast (the fake engine of test_checkpoint_files):
checksums name a damaged file, --resume auto takes the newest good checkpoint, a later save
of a damaged step replaces it, retention keeps good ones, a kill at any point of a save
leaves a loadable checkpoint, and a save that cannot be written stops training."""
from __future__ import annotations

import errno
import os

import pytest

from nsa_dist.checkpoint import LATEST_FILE, META_FILE, verify_checkpoint
from nsa_dist.training import checkpoint as ckpt_mod
from nsa_dist.training.checkpoint import find_resume_checkpoint
from nsa_dist.training.exits import CheckpointWriteError
from test_checkpoint_files import FakeEngine, manager

MODEL_FILE = "mp_rank_00_model_states.pt"


def _flip_byte(path, at: int = 50) -> None:
    with open(path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _latest(root) -> str:
    return (root / LATEST_FILE).read_text().strip()


def test_flipped_byte_fails_the_checksum_naming_the_file(tmp_path):
    m = manager(tmp_path)
    m.save(FakeEngine(), 1, {})
    path = m.save(FakeEngine(), 2, {})
    assert set(verify_checkpoint(path)["sha256"]) == {MODEL_FILE, "rng_rank00000.pt"}
    _flip_byte(os.path.join(path, MODEL_FILE))  # same size: only the checksum sees it
    with pytest.raises(ValueError, match=f"{MODEL_FILE} fails its sha256 check"):
        verify_checkpoint(path)
    verify_checkpoint(path, checksums=False)  # sizes alone pass
    warnings = []
    assert find_resume_checkpoint("auto", str(tmp_path), warn=warnings.append).endswith("step_00000001")
    assert len(warnings) == 1 and "step_00000002" in warnings[0] and MODEL_FILE in warnings[0]
    with pytest.raises(ValueError, match=MODEL_FILE):  # an explicit path is refused too
        find_resume_checkpoint(path, str(tmp_path))


def test_latest_lagging_takes_the_newest_good(tmp_path):
    m = manager(tmp_path)
    m.save(FakeEngine(), 1, {})
    m.save(FakeEngine(), 2, {})
    (tmp_path / LATEST_FILE).write_text("step_00000001\n")
    warnings = []
    assert find_resume_checkpoint("auto", str(tmp_path), warn=warnings.append).endswith("step_00000002")
    assert "'latest' names step_00000001" in warnings[0]


def test_reaching_a_damaged_step_again_replaces_its_folder(tmp_path):
    first = manager(tmp_path)
    first.save(FakeEngine(), 1, {"mark": 1})
    damaged = first.save(FakeEngine(), 2, {"mark": 1})
    with open(os.path.join(damaged, MODEL_FILE), "r+b") as fh:
        fh.truncate(10)
    open(os.path.join(damaged, "stale_extra.pt"), "wb").close()
    # The restarted run resumes from step 1 and reaches step 2 again.
    second, logs = manager(tmp_path), []
    second.log = logs.append
    found = find_resume_checkpoint("auto", str(tmp_path), warn=lambda m: None)
    second.load(FakeEngine(), found)
    path = second.save(FakeEngine(), 2, {"mark": 2})
    assert path == damaged and verify_checkpoint(path)["mark"] == 2
    assert "stale_extra.pt" not in os.listdir(path)
    assert _latest(tmp_path) == "step_00000002" and any("replacing" in line for line in logs)


def test_a_save_removes_later_steps_of_an_abandoned_continuation(tmp_path):
    first = manager(tmp_path)
    for step in (1, 2, 3):
        first.save(FakeEngine(), step, {})
    second = manager(tmp_path)
    second.load(FakeEngine(), str(tmp_path / "step_00000001"))  # e.g. --resume step_00000001
    second.save(FakeEngine(), 2, {})
    assert sorted(os.listdir(tmp_path)) == [LATEST_FILE, "step_00000001", "step_00000002"]
    assert find_resume_checkpoint("auto", str(tmp_path)).endswith("step_00000002")


def test_retention_keeps_good_checkpoints_not_damaged_ones(tmp_path):
    m = manager(tmp_path, keep=2)
    m.save(FakeEngine(), 1, {})
    m.save(FakeEngine(), 2, {})
    with open(tmp_path / "step_00000002" / MODEL_FILE, "r+b") as fh:
        fh.truncate(10)
    m.save(FakeEngine(), 3, {})
    # keep=2: the new one and the newest good one before it (step 1, not the damaged 2).
    assert sorted(os.listdir(tmp_path)) == [LATEST_FILE, "step_00000001", "step_00000003"]


class _Killed(BaseException):
    """Stands in for a kill: not an Exception, so nothing cleans up after it."""


@pytest.mark.parametrize("when", ["engine", "rng", "checksums", "manifest", "latest"])
def test_kill_during_a_save_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, when):
    m = manager(tmp_path)
    m.save(FakeEngine(), 1, {})
    engine = FakeEngine()
    if when == "engine":
        engine.fail = True
    if when == "rng":
        monkeypatch.setattr(ckpt_mod, "rng_state", lambda: (_ for _ in ()).throw(_Killed()))
    if when == "checksums":
        monkeypatch.setattr(ckpt_mod, "sha256_file", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
    if when in ("manifest", "latest"):
        real, target = ckpt_mod.atomic_write, META_FILE if when == "manifest" else LATEST_FILE

        def atomic_write(path, data):
            if path.endswith(target):
                raise _Killed()
            real(path, data)
        monkeypatch.setattr(ckpt_mod, "atomic_write", atomic_write)
    with pytest.raises((_Killed, KeyboardInterrupt)):
        m.save(engine, 2, {})
    assert _latest(tmp_path) == "step_00000001"
    monkeypatch.undo()
    found = find_resume_checkpoint("auto", str(tmp_path), warn=lambda m: None)
    # Killed after the manifest was written, the new checkpoint is complete and good.
    assert found.endswith("step_00000002" if when == "latest" else "step_00000001")
    restarted = manager(tmp_path)
    restarted.load(FakeEngine(), found)
    verify_checkpoint(restarted.save(FakeEngine(), 2, {}))
    assert _latest(tmp_path) == "step_00000002"


@pytest.mark.parametrize("phase", ["engine", "manifest"])
def test_a_save_that_cannot_be_written_stops_and_keeps_the_previous(tmp_path, monkeypatch, phase):
    m = manager(tmp_path, keep=1)
    first = m.save(FakeEngine(), 1, {})
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    engine = FakeEngine()
    if phase == "engine":
        def save_checkpoint(root, tag, save_latest):
            os.makedirs(os.path.join(root, tag), exist_ok=True)
            (tmp_path / tag / MODEL_FILE).write_bytes(b"x" * 10)
            raise disk_full
        engine.save_checkpoint = save_checkpoint
    else:
        monkeypatch.setattr(ckpt_mod, "atomic_write", lambda *a: (_ for _ in ()).throw(disk_full))
    with pytest.raises(CheckpointWriteError, match=r"step_00000002 .*No space left.*step_00000001 is intact"):
        m.save(engine, 2, {})
    assert not (tmp_path / "step_00000002").exists()  # no partial folder to mistake for a checkpoint
    assert _latest(tmp_path) == "step_00000001"
    verify_checkpoint(first)


def test_a_failure_on_another_rank_fails_this_one_too(tmp_path):
    votes = []
    m = manager(tmp_path)
    m.agree = lambda ok: votes.append(ok) or len(votes) != 2  # the other rank's files failed
    with pytest.raises(CheckpointWriteError, match="another rank failed"):
        m.save(FakeEngine(), 1, {})
    assert not (tmp_path / "step_00000001").exists() and not (tmp_path / LATEST_FILE).exists()


def test_a_restarted_worker_continues_this_run(tmp_path, monkeypatch):
    from nsa_dist.training.resume import choose_checkpoint, resume_arg

    other = tmp_path / "other"
    manager(other).save(FakeEngine(), 1, {})  # e.g. the reshard output the run started from
    root = tmp_path / "run"
    assert choose_checkpoint(str(other / "step_00000001"), str(root), print).startswith(str(other))
    manager(root).save(FakeEngine(), 4, {})
    assert resume_arg(None) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert resume_arg(None) == "auto" and resume_arg("none") == "none"
    said = []
    assert choose_checkpoint(str(other / "step_00000001"), str(root), said.append).endswith("run/step_00000004")
    assert choose_checkpoint("none", str(root), said.append).endswith("run/step_00000004")
    assert "restart 1 by the launcher" in said[0]
    assert choose_checkpoint(str(other / "step_00000001"), str(tmp_path / "empty"), said.append).startswith(str(other))


def test_checksums_are_shared_out_between_ranks(tmp_path):
    """Rank 0 of 2 hashes every other file; the other rank's share arrives through gather."""
    m = ckpt_mod.CheckpointManager(str(tmp_path), rank=0, world_size=2, barrier=lambda: None)
    shares = []

    def gather(mine):
        names = sorted(os.listdir(tmp_path / "step_00000001"))
        other = {n: ckpt_mod.sha256_file(str(tmp_path / "step_00000001" / n)) for n in names[1::2]}
        shares.append(mine)
        return [mine, other]
    m.gather = gather
    meta = verify_checkpoint(m.save(FakeEngine(), 1, {}))
    assert len(shares[0]) == 1 and set(meta["sha256"]) == set(meta["files"]) == {MODEL_FILE, "rng_rank00000.pt"}
    m.gather = lambda mine: [mine, {"not_here.pt": "00"}]  # a rank on another, unshared disk
    with pytest.raises(CheckpointWriteError, match="file system that all nodes share"):
        m.save(FakeEngine(), 2, {})

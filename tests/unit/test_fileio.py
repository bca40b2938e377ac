"""The one atomic-write helper: a failed write leaves the old file (or nothing) and no temporary."""
import os

import pytest

from nsa_dist.fileio import AtomicFile, atomic_dir, atomic_open, atomic_write, is_temp


def test_write_replaces_and_an_error_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "a.json"  # the folder is made
    atomic_write(path, "one")
    atomic_write(path, b"two")
    assert path.read_text() == "two"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(path) as fh:
            fh.write("half")
            raise RuntimeError("boom")
    assert path.read_text() == "two"
    assert os.listdir(tmp_path / "sub") == ["a.json"]
    with pytest.raises(ValueError, match="mode must start with 'w'"):
        with atomic_open(path, "a"):
            pass


def test_atomic_file_keeps_the_extension_and_follows_the_umask(tmp_path):
    with AtomicFile(tmp_path / "plot.png") as f:
        assert f.tmp.endswith(".png") and is_temp(f.tmp) and os.path.dirname(f.tmp) == str(tmp_path)
        with open(f.tmp, "wb") as fh:
            fh.write(b"x")
    mode = os.stat(tmp_path / "plot.png").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not mkstemp's 0600
    f = AtomicFile(tmp_path / "never")
    f.discard()
    assert sorted(os.listdir(tmp_path)) == ["plot.png"]


def test_atomic_dir_refuses_then_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        open(os.path.join(tmp, "f"), "w").close()
    assert os.listdir(out) == ["f"]
    with pytest.raises(FileExistsError, match="--force"):
        with atomic_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(out, force=True) as tmp:
            open(os.path.join(tmp, "g"), "w").close()
            raise RuntimeError("interrupted")
    assert os.listdir(out) == ["f"]  # the old output is untouched
    with atomic_dir(out, force=True) as tmp:
        open(os.path.join(tmp, "g"), "w").close()
    assert os.listdir(out) == ["g"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporaries left

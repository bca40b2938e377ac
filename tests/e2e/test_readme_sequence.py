"""The README's user path as written (issue 26): the main job, ``consolidate --optimizer``,
``generate`` from the consolidated folder, ``to-hf``, then the README's ``transformers`` snippet
(``AutoModelForCausalLM`` + ``AutoTokenizer``, generate). Every step must exit 0.

The commands are taken from README.md itself, so the README cannot drift from what is tested.
They run in a copy of the repository's tracked files (the main job deletes ``runs/tiny_cpu`` and
writes ``data_cache/``), with this interpreter's folder first on PATH, as an activated venv
would put it. The main job trains 30 steps instead of 1000 (its extra arguments are overrides).
About 3 minutes on 2 CPU cores.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, _env

pytestmark = pytest.mark.slow

STEPS = ("nsa-convert consolidate runs/tiny_cpu ", "python tools/generate.py --config configs/model/tiny.yaml --checkpoint ",
         "nsa-convert to-hf ")


def _readme_commands(readme: str) -> list[str]:
    """The README lines that start with each of STEPS, in that order (one each)."""
    lines = [line.strip() for line in readme.splitlines()]
    found = []
    for start in STEPS:
        hits = [line for line in lines if line.startswith(start)]
        assert len(hits) == 1, f"README.md should hold one command starting with {start!r}, has {hits}"
        found.append(hits[0])
    return found


def _readme_transformers_snippet(readme: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    hits = [b for b in blocks if "AutoTokenizer.from_pretrained" in b and "AutoModelForCausalLM" in b]
    assert len(hits) == 1, "README.md should hold one python block loading the export with transformers"
    return hits[0]


def _copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _venv_path(tmp: Path) -> str:
    """PATH as an activated venv gives it: this interpreter's folder first (python, nsa-convert).
    Where nsa-convert is not installed there, a stand-in calls tools/convert_checkpoint.py."""
    bindir = Path(sys.executable).parent
    shims = tmp / "bin"
    shims.mkdir()
    for name, target in (("python", ""), ("nsa-convert", " tools/convert_checkpoint.py")):
        if not (bindir / name).exists():
            shim = shims / name
            shim.write_text(f'#!/bin/sh\nexec "{sys.executable}"{target} "$@"\n')
            shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return os.pathsep.join([str(shims), str(bindir), os.environ.get("PATH", "")])


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(cmd)}: exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
                                  f"\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


def test_readme_sequence(tmp_path):
    pytest.importorskip("transformers")
    readme = (ROOT / "README.md").read_text()
    commands, snippet = _readme_commands(readme), _readme_transformers_snippet(readme)
    repo = tmp_path / "repo"
    _copy_repo(repo)
    env = {**_env(), "PYTHON": sys.executable, "PATH": _venv_path(tmp_path)}
    env["PYTHONPATH"] = str(repo)

    _run(["bash", "tools/main_job.sh", "train_steps=30", "eval_every=0", "save_every=0", "log_every=10"],
         repo, env, timeout=900)
    assert (repo / "runs/tiny_cpu/summary.json").is_file()
    outputs = [_run(["bash", "-c", command], repo, env, timeout=600) for command in commands]
    assert (repo / "out/nsa_consolidated/optimizer.safetensors").is_file()  # --optimizer was honoured
    assert outputs[1].stdout.startswith("def ")  # generate printed the prompt and its continuation
    assert (repo / "out/hf_dir/tokenizer.json").is_file()
    proc = _run([sys.executable, "-c", snippet], repo, env, timeout=600)
    text = proc.stdout
    assert "Do you wish to run the custom code" not in text + proc.stderr, text
    assert text.startswith("def ") and len(text) > len("def \n"), text  # print adds one newline; the rest was generated

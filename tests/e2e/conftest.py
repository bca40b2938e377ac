"""Fixtures of the trainer's end-to-end tests: a tiny corpus, tokenizer, shards and model
YAML (built once per session), and helpers that run ``nsa-pretrain`` in subprocesses."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

# Small enough for a 2-core CPU: ~0.1M parameters, 128-token samples.
TINY_MODEL = {
    "vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
    "head_dim": 16, "intermediate_size": 128, "max_seq_len": 256, "tie_embeddings": True,
    "attention": "nsa",
    "nsa": {"cmp_block": 16, "cmp_stride": 8, "sel_block": 32, "num_selected": 3, "window": 32,
            "phi": "mlp"},
}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """Tokenizer (vocab 512) and train/valid shards of three stdlib packages."""
    import email
    import http
    import json as json_pkg

    from nsa_dist.data.shards import preprocess_corpus
    from nsa_dist.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    inputs = [os.path.dirname(m.__file__) for m in (json_pkg, email, http)]
    quiet = (lambda msg: None)
    train_tokenizer(inputs, 512, root / "tokenizer", max_sentences=20000, log=quiet)
    preprocess_corpus(inputs, root / "tokenizer", root / "corpus", valid_fraction=0.2, log=quiet)
    model_yaml = root / "model.yaml"
    model_yaml.write_text(yaml.safe_dump(TINY_MODEL))
    return {"root": root, "tokenizer": str(root / "tokenizer"), "prefix": str(root / "corpus"),
            "model": str(model_yaml)}


@pytest.fixture(scope="session")
def one_and_tp2_runs(tiny_data, tmp_path_factory) -> tuple:
    """(one-rank config, TP=2 config): the same 6 ZeRO-1 steps on one rank (no launcher) and
    on two tensor-parallel ranks through launch/deepspeed.sh, both finished. Shared read-only
    by the TP and consolidate tests: copy a run before damaging it."""
    root = tmp_path_factory.mktemp("one_and_tp2")
    zero1 = str(ROOT / "configs/deepspeed/zero1.json")
    one = train_yaml(tiny_data, root / "one", deepspeed=zero1)
    check(run_pretrain(one))
    tp = train_yaml(tiny_data, root / "tp", deepspeed=zero1, parallel={"tp": 2})
    check(run_launcher("deepspeed.sh", tp, launcher_args=("--nproc", "2", "--master-port", str(free_port()))))
    return one, tp


def train_yaml(tiny_data: dict, out_dir: Path, **overrides) -> Path:
    """Write a train YAML for the tiny model into ``out_dir`` and return its path."""
    cfg = {"model": tiny_data["model"], "deepspeed": str(ROOT / "configs/deepspeed/zero2.json"),
           "data_prefix": tiny_data["prefix"], "tokenizer": tiny_data["tokenizer"],
           "output_dir": str(out_dir / "run"), "seq_len": 128, "micro_batch_size": 2,
           "grad_accum_steps": 1, "train_steps": 6, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
           "decay_steps": 10, "eval_every": 0, "eval_batches": 2, "save_every": 0, "log_every": 2,
           "image_every": 4, "seed": 7}
    cfg.update(overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pretrain(config: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """One process, no launcher (a world of one)."""
    cmd = [sys.executable, "-m", "nsa_dist.training", "--config", str(config), *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def run_launcher(script: str, config: Path, *args: str, launcher_args: tuple = (),
                 timeout: int = 400) -> subprocess.CompletedProcess:
    """``launch/<script>`` with its own options, then the config and trainer args. A deepspeed
    launch gets its own port, and the shared-memory buffers of that rendezvous are removed
    afterwards whatever way the run ended (the trainer removes them itself when it starts)."""
    env = _env()
    env["PYTHON"] = sys.executable
    port = None
    if script == "deepspeed.sh":
        if "--master-port" in launcher_args:
            port = launcher_args[launcher_args.index("--master-port") + 1]
        else:
            port = free_port()
            launcher_args = ("--master-port", str(port), *launcher_args)
    cmd = ["bash", str(ROOT / "launch" / script), *launcher_args, str(config), *args]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        if port is not None:
            for path in shm_buffers(port):
                os.unlink(path)


def shm_buffers(port: int) -> list:
    """DeepSpeed's CPU allreduce buffers in /dev/shm of this user and a rendezvous on ``port``."""
    import glob

    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")


def summary(config: Path) -> dict:
    out = yaml.safe_load(Path(config).read_text())["output_dir"]
    return json.loads((Path(out) / "summary.json").read_text())


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"

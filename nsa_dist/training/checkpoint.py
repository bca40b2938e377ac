"""The trainer's checkpoints: DeepSpeed's own files plus our metadata and RNG states, in the
folder layout of ``nsa_dist.checkpoint.files``::

    step_00000050/            DeepSpeed files (model, ZeRO shards) of step 50
        rng_rank00000.pt      python/numpy/torch RNG states of each rank
        nsa_meta.json         configs, tokenizer path + sha256, data position, file sizes
    latest                    the tag of the newest complete checkpoint

A save writes the DeepSpeed files and RNG states, then ``nsa_meta.json`` (its presence makes
the folder complete; it lists every file with its size), then ``latest``. Each of the last
two is written to a temporary name and renamed, so a save interrupted at any point leaves
``latest`` naming the previous complete checkpoint. Loading checks the sizes, so a truncated
file is a clear error rather than a crash deep inside ``torch.load``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Callable, Optional

import numpy as np
import torch

from ..checkpoint.files import (FORMAT_VERSION, LATEST_FILE, META_FILE, file_sizes, is_complete,
                                list_checkpoints, read_latest, tag_for_step, verify_checkpoint)
from ..checkpoint.tensors import load_allowlisted
from ..config import ModelConfig
from ..fileio import AtomicFile, atomic_write, is_temp

# ----------------------------------------------------------------------------- RNG states

def rng_state() -> dict:
    """Every RNG the training loop may draw from (python, numpy, torch CPU and CUDA). Only
    tensors and plain Python values, so the file loads with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else keys
    np.random.set_state((name, keys.astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def load_rng_file(path: str) -> dict:
    """An RNG file. Files of earlier versions hold numpy's state array: numpy's own
    array-rebuilding classes (and the uint32 dtype class, which the scan does not list) are
    allowed for them, nothing else."""
    return load_allowlisted(path, lambda n: n.split(".")[0] == "numpy", extra=(type(np.dtype(np.uint32)),))


# ----------------------------------------------------------------------------- finding

def find_resume_checkpoint(resume: Optional[str], root: str,
                           warn: Callable[[str], None] = print) -> Optional[str]:
    """The checkpoint folder to resume from, or None to start fresh.

    resume: None/"" or "none" (fresh start), "auto" (the checkpoint ``latest`` names under
    ``root``, else the newest complete one, else None), or a path: a checkpoint folder or a
    checkpoints root holding ``latest`` (a bad path is FileNotFoundError/ValueError).
    """
    if not resume or resume == "none":
        return None
    if resume == "auto":
        candidate = read_latest(root)
        if candidate is not None:
            try:
                verify_checkpoint(candidate)
                return candidate
            except (FileNotFoundError, ValueError) as err:
                warn(f"[checkpoint] 'latest' names an unusable checkpoint ({err}); "
                     f"looking for an older complete one")
        for candidate in reversed(list_checkpoints(root)):
            try:
                verify_checkpoint(candidate)
                return candidate
            except (FileNotFoundError, ValueError):
                continue
        return None
    if not os.path.exists(resume):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint (give a checkpoint "
                                f"folder, a checkpoints folder with '{LATEST_FILE}', or 'auto')")
    if os.path.isdir(resume) and not is_complete(resume):
        resume = read_latest(resume) or resume
    verify_checkpoint(resume)
    return resume


# ----------------------------------------------------------------------------- saving

class CheckpointManager:
    """Saves and loads checkpoints of one run; every rank calls save/load (collective).

    engine: a DeepSpeed engine (``save_checkpoint(dir, tag=, save_latest=)``,
    ``load_checkpoint(dir, tag=, ...)``); barrier: a callable synchronising all ranks.
    """

    def __init__(self, root: str, rank: int, world_size: int, barrier: Callable[[], None],
                 keep: int = 0):
        self.root, self.rank, self.world_size = root, rank, world_size
        self.barrier, self.keep = barrier, keep

    def save(self, engine, step: int, meta: dict) -> str:
        """Write checkpoint ``step`` and return its folder. ``meta`` (JSON-able) is stored
        with the file sizes; the ``latest`` marker moves only when everything is written."""
        tag = tag_for_step(step)
        tag_dir = os.path.join(self.root, tag)
        if is_complete(tag_dir):  # already saved (e.g. resumed at the last step): keep it
            return tag_dir
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            if os.path.isdir(tag_dir):  # a leftover of an interrupted save of this step
                shutil.rmtree(tag_dir)
        self.barrier()
        engine.save_checkpoint(self.root, tag=tag, save_latest=False)
        os.makedirs(tag_dir, exist_ok=True)
        with AtomicFile(os.path.join(tag_dir, rng_file(self.rank))) as f:
            torch.save(rng_state(), f.tmp)
        self.barrier()
        if self.rank == 0:
            record = dict(meta, format_version=FORMAT_VERSION, tag=tag, step=step,
                          world_size=self.world_size, files=file_sizes(tag_dir, skip=is_temp))
            atomic_write(os.path.join(tag_dir, META_FILE), json.dumps(record, indent=2) + "\n")
            atomic_write(os.path.join(self.root, LATEST_FILE), tag + "\n")
            self._prune(keep_tag=tag)
        self.barrier()
        return tag_dir

    def _prune(self, keep_tag: str) -> None:
        """Delete all but the newest ``keep`` complete checkpoints, and incomplete leftovers
        older than the newest complete one."""
        if self.keep <= 0:
            return
        tags = list_checkpoints(self.root)
        complete = [t for t in tags if is_complete(t)]
        keep = set(complete[-self.keep:]) | {os.path.join(self.root, keep_tag)}
        for t in tags:
            if t not in keep and (is_complete(t) or t < complete[-1]):
                shutil.rmtree(t, ignore_errors=True)

    def load(self, engine, tag_dir: str, custom_load_fn: Optional[Callable] = None) -> dict:
        """Load ``tag_dir`` into ``engine`` and restore this rank's RNG states; returns the
        metadata. The caller checks it against the current configs first
        (``check_compatible``). custom_load_fn(src=state dict, dst=module): loads the module
        state instead of ``load_state_dict`` (e.g. renaming it first)."""
        meta = verify_checkpoint(tag_dir)
        root, tag = os.path.split(os.path.normpath(tag_dir))
        load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False,
                                              load_module_strict=True, custom_load_fn=custom_load_fn)
        if load_path is None:
            raise ValueError(f"DeepSpeed could not load checkpoint {tag_dir}")
        rng_path = os.path.join(tag_dir, rng_file(self.rank))
        if os.path.isfile(rng_path):
            set_rng_state(load_rng_file(rng_path))
        return meta


def check_compatible(meta: dict, model_cfg: dict, tokenizer_sha: Optional[str],
                     data_prefix: str, seq_len: int, dp_world_size: int,
                     layout: Optional[tuple[int, int]] = None) -> list[str]:
    """Raise ValueError when resuming ``meta`` would not continue the same run; return
    warnings for harmless differences. ``dp_world_size``: this run's world size (all ranks);
    ``layout``: this run's (tp, sp), which a DeepSpeed checkpoint must share (its files are
    per TP rank and per ZeRO rank; a layout-free ``reshard`` output loads on any)."""
    problems, warnings = [], []
    then_cfg = meta.get("model_config") or {}
    now, then = ModelConfig.function_fields(model_cfg), ModelConfig.function_fields(then_cfg)
    if now != then:
        diff = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
        problems.append(f"the model config differs in {diff}")
    changed = [k for k in ModelConfig.EXECUTION_FIELDS if k in then_cfg and then_cfg[k] != model_cfg.get(k)]
    if changed:  # written by an older version when absent: nothing to say
        warnings.append("model execution settings changed: " + ", ".join(
            f"{k} {then_cfg[k]!r} -> {model_cfg.get(k)!r}" for k in changed))
    if tokenizer_sha and meta.get("tokenizer_sha256") not in (None, tokenizer_sha):
        problems.append(f"the tokenizer differs (sha256 {meta.get('tokenizer_sha256', '')[:12]} "
                        f"in the checkpoint, {tokenizer_sha[:12]} now)")
    if meta.get("seq_len") not in (None, seq_len):  # None: a consolidated model resharded
        problems.append(f"seq_len differs ({meta.get('seq_len')} in the checkpoint, {seq_len} now)")
    if meta.get("layout") != "full" and meta.get("world_size") != dp_world_size:
        problems.append(f"the data-parallel size differs ({meta.get('world_size')} in the "
                        f"checkpoint, {dp_world_size} now); ZeRO shards are per rank: "
                        f"convert it with 'nsa-convert reshard' to resume on another layout")
    par = (meta.get("train_config") or {}).get("parallel") or {}
    then = (par.get("tp", 1), par.get("sp", 1))
    if meta.get("layout") != "full" and layout is not None and tuple(layout) != then:
        problems.append(f"the layout differs (tp={then[0]}, sp={then[1]} in the checkpoint, "
                        f"tp={layout[0]}, sp={layout[1]} now); its files are per TP rank: convert "
                        f"it with 'nsa-convert reshard' to resume on another layout")
    if os.path.abspath(meta.get("data_prefix", data_prefix)) != os.path.abspath(data_prefix):
        warnings.append(f"data_prefix changed: {meta.get('data_prefix')} -> {data_prefix}")
    if problems:
        raise ValueError(f"cannot resume from {meta.get('tag')}: " + "; ".join(problems))
    return warnings

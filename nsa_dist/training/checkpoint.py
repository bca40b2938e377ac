"""The trainer's checkpoints: DeepSpeed's own files plus our metadata and RNG states, in the
folder layout of ``nsa_dist.checkpoint.files``::

    step_00000050/            DeepSpeed files (model, ZeRO shards) of step 50
        rng_rank00000.pt      python/numpy/torch RNG states of each rank
        nsa_meta.json         configs, tokenizer path + sha256, data position, the manifest
    latest                    the tag of the newest complete checkpoint

A save writes the DeepSpeed files and RNG states, then ``nsa_meta.json`` (its presence makes
the folder complete; its manifest lists every file with size and sha256), then ``latest``.
Each of the last two is written to a temporary name and renamed, so a save interrupted at
any point leaves ``latest`` naming the previous complete checkpoint.

``--resume auto`` takes the newest checkpoint that is complete and passes the manifest
check, reporting (by file) each newer one it skips. Saving a step whose folder exists (a
damaged or abandoned one left by an earlier attempt) replaces that folder, and folders of
later steps (a continuation this run abandoned by resuming earlier) are removed, so
``latest``, the summary and ``--resume auto`` all name what this run wrote.
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
                                list_checkpoints, read_latest, sha256_file, tag_for_step, verify_checkpoint)
from ..checkpoint.tensors import load_allowlisted
from ..config import ModelConfig
from ..fileio import AtomicFile, atomic_write, is_temp
from .exits import CheckpointWriteError

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

    resume: None/"" or "none" (fresh start), "auto" (the newest checkpoint under ``root``
    that is complete and passes ``verify_checkpoint``, sizes and checksums; each newer one
    skipped is reported through ``warn`` naming the file; None when there is none), or a path:
    a checkpoint folder or a checkpoints root holding ``latest`` (a bad or damaged one is
    FileNotFoundError/ValueError).
    """
    if not resume or resume == "none":
        return None
    if resume == "auto":
        return _newest_good(root, warn)
    if not os.path.exists(resume):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint (give a checkpoint "
                                f"folder, a checkpoints folder with '{LATEST_FILE}', or 'auto')")
    if os.path.isdir(resume) and not is_complete(resume):
        resume = read_latest(resume) or resume
    verify_checkpoint(resume)
    return resume


def _newest_good(root: str, warn: Callable[[str], None]) -> Optional[str]:
    tags = list_checkpoints(root)
    latest = read_latest(root)
    for candidate in reversed(tags):
        if not is_complete(candidate):
            warn(f"[checkpoint] skipping unusable {candidate}: incomplete (no {META_FILE}; its save was "
                 f"interrupted)")
            continue
        try:
            verify_checkpoint(candidate)
        except (FileNotFoundError, ValueError) as err:
            warn(f"[checkpoint] skipping unusable {candidate}: {err}")
            continue
        if latest in tags and tags.index(latest) < tags.index(candidate):  # killed before 'latest' moved
            warn(f"[checkpoint] '{LATEST_FILE}' names {os.path.basename(latest)}, but "
                 f"{os.path.basename(candidate)} is newer and complete: taking it")
        return candidate
    return None


# ----------------------------------------------------------------------------- saving

class CheckpointManager:
    """Saves and loads checkpoints of one run; every rank calls save/load (collective).

    engine: a DeepSpeed engine (``save_checkpoint(dir, tag=, save_latest=)``,
    ``load_checkpoint(dir, tag=, ...)``); barrier: a callable synchronising all ranks;
    keep: complete checkpoints kept (0: all); log: rank 0's printer; agree(ok): True when
    ``ok`` holds on every rank (a collective); gather(obj): every rank's ``obj``, in rank
    order (a collective). The checkpoint folder must be on a file system all ranks share.
    """

    def __init__(self, root: str, rank: int, world_size: int, barrier: Callable[[], None],
                 keep: int = 0, log: Callable[[str], None] = print,
                 agree: Optional[Callable[[bool], bool]] = None,
                 gather: Optional[Callable[[object], list]] = None):
        self.root, self.rank, self.world_size = root, rank, world_size
        self.barrier, self.keep, self.log = barrier, keep, log
        self.agree = agree or (lambda ok: (barrier(), ok)[1])
        self.gather = gather or (lambda obj: [obj])
        self._mine: set[str] = set()  # folders this run wrote or loaded: a save of their step keeps them

    def save(self, engine, step: int, meta: dict) -> str:
        """Write checkpoint ``step`` and return its folder. ``meta`` (JSON-able) is stored
        with the manifest; the ``latest`` marker moves only when everything is written.

        A write that fails on any rank (disk full, read-only, I/O error) fails on all of
        them with ``CheckpointWriteError``: the partial folder is removed, ``latest`` and
        the earlier checkpoints are left as they were."""
        tag = tag_for_step(step)
        tag_dir = os.path.join(self.root, tag)
        if tag_dir in self._mine and is_complete(tag_dir):  # e.g. resumed at the last step
            return tag_dir
        # Phases, each ended by ``agree``: no rank enters a collective of the next phase while
        # another is failing in this one. The checksums are shared out: each rank reads a
        # slice of the files, so a large checkpoint is not read by rank 0 alone.
        digests: dict = {}
        self._phase(tag_dir, lambda: self._clear(tag_dir) if self.rank == 0 else None)
        self._phase(tag_dir, lambda: self._write_rank_files(engine, tag, tag_dir))
        self._phase(tag_dir, lambda: digests.update(self._hash_share(tag_dir)))
        shares = self.gather(digests)
        self._phase(tag_dir, lambda: self._write_manifest(tag_dir, tag, step, meta, shares)
                    if self.rank == 0 else None)
        self._mine.add(tag_dir)
        return tag_dir

    def _phase(self, tag_dir: str, write: Callable[[], None]) -> None:
        error = None
        try:
            write()
        except Exception as err:  # OSError mostly; anything else is as fatal for the save
            error = err
        if self.agree(error is None):
            return
        if self.rank == 0 and not (os.path.isdir(tag_dir) and is_complete(tag_dir)):
            shutil.rmtree(tag_dir, ignore_errors=True)
        previous = read_latest(self.root)
        where = f"rank {self.rank}: {type(error).__name__}: {error}" if error else "another rank failed"
        raise CheckpointWriteError(
            f"could not write checkpoint {tag_dir} ({where}); training stops here. The previous "
            f"checkpoint {previous or '(none)'} is intact: free space or fix the permissions of "
            f"{self.root}, then rerun with --resume auto") from error

    def _clear(self, tag_dir: str) -> None:
        os.makedirs(self.root, exist_ok=True)
        if os.path.isdir(tag_dir):  # an interrupted, damaged or abandoned save of this step
            self.log(f"[checkpoint] replacing {tag_dir} (left by an earlier attempt)")
            shutil.rmtree(tag_dir)

    def _write_rank_files(self, engine, tag: str, tag_dir: str) -> None:
        engine.save_checkpoint(self.root, tag=tag, save_latest=False)
        os.makedirs(tag_dir, exist_ok=True)
        with AtomicFile(os.path.join(tag_dir, rng_file(self.rank))) as f:
            torch.save(rng_state(), f.tmp)

    def _hash_share(self, tag_dir: str) -> dict[str, str]:
        """sha256 of this rank's slice of the folder's files (every ``world_size``-th name)."""
        names = sorted(file_sizes(tag_dir, skip=is_temp))
        return {n: sha256_file(os.path.join(tag_dir, n)) for n in names[self.rank::self.world_size]}

    def _write_manifest(self, tag_dir: str, tag: str, step: int, meta: dict, shares: list) -> None:
        sizes = file_sizes(tag_dir, skip=is_temp)
        digests = {n: d for share in shares for n, d in share.items()}
        if set(digests) != set(sizes):
            raise ValueError(f"the ranks see different files in {tag_dir} (rank 0 has {len(sizes)}, "
                             f"the ranks hashed {len(digests)}): checkpoints need a file system that "
                             f"all nodes share")
        record = dict(meta, format_version=FORMAT_VERSION, tag=tag, step=step, world_size=self.world_size,
                      files=sizes, sha256=dict(sorted(digests.items())))
        atomic_write(os.path.join(tag_dir, META_FILE), json.dumps(record, indent=2) + "\n")
        atomic_write(os.path.join(self.root, LATEST_FILE), tag + "\n")
        self._prune(tag_dir)

    def _prune(self, saved: str) -> None:
        """After saving ``saved``: remove folders of later steps (left by a continuation this
        run abandoned), and of the earlier ones keep the newest ``keep - 1`` complete ones
        whose files have their recorded sizes; ``saved`` itself, the newest good one, stays."""
        tags = list_checkpoints(self.root)
        at = tags.index(saved)
        for t in tags[at + 1:]:
            self.log(f"[checkpoint] removing {t}: a later step of an abandoned continuation")
            shutil.rmtree(t, ignore_errors=True)
        if self.keep <= 0:
            return
        older = tags[:at]
        good = [t for t in older if _sizes_ok(t)]
        kept = set(good[len(good) - (self.keep - 1):]) if self.keep > 1 else set()
        for t in older:
            if t not in kept:
                shutil.rmtree(t, ignore_errors=True)

    def load(self, engine, tag_dir: str, custom_load_fn: Optional[Callable] = None) -> dict:
        """Load ``tag_dir`` into ``engine`` and restore this rank's RNG states; returns the
        metadata. The caller checks it against the current configs first
        (``check_compatible``) and its checksums (``find_resume_checkpoint``; here only the
        sizes). custom_load_fn(src=state dict, dst=module): loads the module state instead of
        ``load_state_dict`` (e.g. renaming it first)."""
        meta = verify_checkpoint(tag_dir, checksums=False)
        root, tag = os.path.split(os.path.normpath(tag_dir))
        load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False,
                                              load_module_strict=True, custom_load_fn=custom_load_fn)
        if load_path is None:
            raise ValueError(f"DeepSpeed could not load checkpoint {tag_dir}")
        rng_path = os.path.join(tag_dir, rng_file(self.rank))
        if os.path.isfile(rng_path):
            set_rng_state(load_rng_file(rng_path))
        if os.path.normpath(root) == os.path.normpath(self.root):
            mine = os.path.join(self.root, tag)
            self._mine.add(mine)
            latest = read_latest(self.root)
            if self.rank == 0 and (latest is None or os.path.normpath(latest) != os.path.normpath(mine)):
                atomic_write(os.path.join(self.root, LATEST_FILE), tag + "\n")  # it lagged
        return meta


def _sizes_ok(tag_dir: str) -> bool:
    """Complete, every listed file at its recorded size (the cheap part of verification)."""
    try:
        verify_checkpoint(tag_dir, checksums=False)
        return True
    except (FileNotFoundError, ValueError):
        return False


def check_compatible(meta: dict, model_cfg: dict, tokenizer_sha: Optional[str],
                     data_prefix: str, seq_len: int, dp_world_size: int,
                     layout: Optional[tuple[int, ...]] = None) -> list[str]:
    """Raise ValueError when resuming ``meta`` would not continue the same run; return
    warnings for harmless differences. ``dp_world_size``: this run's world size (all ranks);
    ``layout``: this run's (tp, sp, cp), which a DeepSpeed checkpoint must share (its files are
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
    keys = ("tp", "sp", "cp")
    then = tuple(par.get(k, 1) for k in keys)
    now = None if layout is None else tuple(layout) + (1,) * (len(keys) - len(layout))
    if meta.get("layout") != "full" and now is not None and now != then:
        shown = 3 if then[2] != 1 or now[2] != 1 else 2  # cp named when either side uses it

        def name(v):
            return ", ".join(f"{k}={x}" for k, x in zip(keys[:shown], v))
        problems.append(f"the layout differs ({name(then)} in the checkpoint, {name(now)} now); its files "
                        f"are per TP rank: convert it with 'nsa-convert reshard' to resume on another layout")
    if os.path.abspath(meta.get("data_prefix", data_prefix)) != os.path.abspath(data_prefix):
        warnings.append(f"data_prefix changed: {meta.get('data_prefix')} -> {data_prefix}")
    if problems:
        raise ValueError(f"cannot resume from {meta.get('tag')}: " + "; ".join(problems))
    return warnings

"""``consolidate``: a training checkpoint of ours (any TP x Ulysses x DP layout) -> one
``model.safetensors`` + ``config.json`` at the single-device model's names and shapes.

Tensor-parallel shards are put back together from the ``param_layout`` the trainer records
in ``nsa_meta.json`` (for each TP rank: local name -> full name and the slice it holds; see
``nsa_dist.checkpoint.layout``).
ZeRO 0-2 weights are read from DeepSpeed's ``mp_rank_XX_model_states.pt``: the run's working
weights (fp32 on CPU runs, bf16 on bf16 GPU runs), or with ``master`` the fp32 copies in the
ZeRO shards; ZeRO-3 weights (and, for ``reshard``, Adam's moments) come from the shards
(``zero_state.py``). Every file is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch

from ..checkpoint.files import OPTIMIZER, find_tag_dir, verify_checkpoint
from ..checkpoint.tensors import save_moments
from ..config import ModelConfig
from ..fileio import atomic_dir
from .io import note, progress, save_consolidated


def assemble(rank_states: list[dict[str, torch.Tensor]], layouts: Optional[list[dict[str, list]]],
             cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full state dict from the TP ranks' state dicts (in TP-rank order) and their layouts."""
    if layouts is None:
        if len(rank_states) != 1:
            raise ValueError(f"{len(rank_states)} model-parallel files but no param_layout in the metadata")
        state = dict(rank_states[0])
    else:
        if len(layouts) != len(rank_states):
            raise ValueError(f"param_layout lists {len(layouts)} TP ranks but {len(rank_states)} "
                             "model-parallel files exist")
        pieces: dict[str, list] = {}
        for st, layout in zip(rank_states, layouts):
            for local, (full, dim, start, stop) in layout.items():
                if local not in st:
                    raise ValueError(f"model-parallel file lacks {local} (expected from param_layout)")
                pieces.setdefault(full, []).append((st[local], dim, start, stop))
        state = {}
        for full, parts in pieces.items():
            if parts[0][1] is None:  # replicated (K/V replicas under tp > H included)
                state[full] = parts[0][0]
                continue
            dim = parts[0][1]
            size = max(stop for _, _, _, stop in parts)
            t0 = parts[0][0]
            out = t0.new_zeros(t0.shape[:dim] + (size,) + t0.shape[dim + 1:])
            covered = torch.zeros(size, dtype=torch.bool)
            for t, _, start, stop in parts:
                out.narrow(dim, start, stop - start).copy_(t)
                covered[start:stop] = True
            if not bool(covered.all()):
                raise ValueError(f"{full}: the TP shards do not cover every row/column")
            state[full] = out
    check_against_model(state, cfg)
    return state


def check_against_model(state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """ValueError naming the first tensor whose name, shape or dtype the config does not
    expect; with tied embeddings ``lm_head.weight`` is removed from ``state``."""
    from ..models import NSADecoderLM

    with torch.device("meta"):
        ref = NSADecoderLM(cfg, backend="reference").state_dict()
    if cfg.tie_embeddings:
        ref.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing, extra = sorted(ref.keys() - state.keys()), sorted(state.keys() - ref.keys())
    if missing or extra:
        raise ValueError(f"checkpoint does not match the model config: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for name, t in ref.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(state[name].shape)}, config says {tuple(t.shape)}")
        if state[name].dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name}: dtype {state[name].dtype}, expected fp32, bf16 or fp16")


def global_batch(meta: dict) -> Optional[int]:
    """Samples per optimizer step of the run that wrote ``meta`` (None when it does not say):
    micro_batch_size x grad_accum_steps x data-parallel size (world / (tp x sp x cp))."""
    if meta.get("global_batch"):
        return int(meta["global_batch"])
    tc, world = meta.get("train_config") or {}, meta.get("world_size")
    if not world or "micro_batch_size" not in tc:
        return None
    par = tc.get("parallel") or {}
    return tc["micro_batch_size"] * tc.get("grad_accum_steps", 1) * (world // (par.get("tp", 1) * par.get("sp", 1) * par.get("cp", 1)))


# What of a training checkpoint's metadata travels with its consolidated weights.
_TRAINING_KEYS = ("step", "consumed_samples", "seq_len", "train_config", "tokenizer_path", "tokenizer_sha256",
                  "data_prefix", "versions")


def training_state(meta: dict, adam_step: Optional[int]) -> dict:
    """The run's position to carry on: step, samples consumed, Adam's step, global batch..."""
    out = {k: meta[k] for k in _TRAINING_KEYS if k in meta}
    out.update(adam_step=adam_step, global_batch=global_batch(meta))
    return out


@dataclass
class FullCheckpoint:
    """A training checkpoint at single-device names and shapes."""
    cfg: ModelConfig
    meta: dict
    params: dict[str, torch.Tensor]
    exp_avg: Optional[dict[str, torch.Tensor]] = None  # Adam moments (fp32), when read
    exp_avg_sq: Optional[dict[str, torch.Tensor]] = None
    adam_step: Optional[int] = None
    tag_dir: str = ""


def read_checkpoint(path: str, master: bool = False, optimizer: bool = False,
                    quiet: bool = True) -> FullCheckpoint:
    """Read a training checkpoint of any TP x Ulysses x DP layout and ZeRO stage.

    path: a step folder, a checkpoints root or a run directory. Weights: the module's
    working weights for ZeRO 0-2 (bf16 on bf16 GPU runs) unless ``master`` (the fp32 copies in
    the ZeRO shards, stages 1-2); always the fp32 shards for ZeRO-3. ``optimizer``: also
    Adam's moments and step (ZeRO 1-3). ``quiet=False``: progress on a terminal.
    """
    from .zero_state import load_ds_file, read_tp_rank

    tag_dir = find_tag_dir(path)
    meta = verify_checkpoint(tag_dir)  # every file present with its recorded size
    cfg = ModelConfig.from_dict(meta["model_config"], where=f"{tag_dir}/nsa_meta.json")
    stage = int(meta.get("deepspeed_config", {}).get("zero_optimization", {}).get("stage", 0))
    layouts = meta.get("param_layout")
    tp = len(layouts) if layouts else 1
    if optimizer and stage == 0:
        raise ValueError(f"{tag_dir} is a ZeRO-0 checkpoint: its optimizer state is not in a form "
                         "nsa-convert reads; pass --reset-optimizer to start Adam afresh")
    out = FullCheckpoint(cfg, meta, {}, tag_dir=tag_dir)
    shard_weights = stage == 3 or (master and stage > 0)  # ZeRO-0 has no shards: module weights
    if shard_weights or optimizer:
        ranks = [read_tp_rank(tag_dir, t, stage, optimizer=optimizer, quiet=quiet) for t in range(tp)]
        if shard_weights:
            out.params = assemble([r.params for r in ranks], layouts, cfg)
        if optimizer:
            out.exp_avg = assemble([r.exp_avg for r in ranks], layouts, cfg)
            out.exp_avg_sq = assemble([r.exp_avg_sq for r in ranks], layouts, cfg)
            out.adam_step = ranks[0].step
    if not out.params:
        files = sorted(f for f in os.listdir(tag_dir) if f.startswith("mp_rank_") and f.endswith("_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{tag_dir} has no mp_rank_XX_model_states.pt")
        if len(files) != tp:
            raise ValueError(f"{tag_dir}: param_layout lists {tp} TP ranks but {len(files)} model files exist")
        states = [load_ds_file(os.path.join(tag_dir, f))["module"]
                  for f in progress(files, "reading model files", quiet)]
        out.params = assemble(states, layouts, cfg)
    return out


def consolidate(path: str, out: str, dtype: Optional[torch.dtype] = None, force: bool = False,
                master: bool = False, quiet: bool = True, optimizer: bool = False) -> str:
    """Write the consolidated checkpoint of ``path`` (a step folder, a checkpoints root or a run
    directory) to ``out``; with ``optimizer`` also Adam's moments and the run's position (for
    ``reshard``). Returns the step folder that was read."""
    if os.path.exists(out) and not force:  # before reading gigabytes
        raise FileExistsError(f"output {os.path.abspath(out)} already exists; pass --force to replace it")
    # With the moments, the fp32 masters they belong to (not a bf16 run's rounded working copy).
    ck = read_checkpoint(path, master=master or optimizer, optimizer=optimizer, quiet=quiet)
    meta, cfg, state = ck.meta, ck.cfg, ck.params
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    extra = {"source_checkpoint": os.path.abspath(ck.tag_dir), "step": meta.get("step")}
    if optimizer:
        extra["training_state"] = training_state(meta, ck.adam_step)
    with atomic_dir(out, force) as tmp:
        note(f"writing {out}", quiet)
        save_consolidated(state, cfg, tmp, extra)
        if optimizer:
            save_moments(ck.exp_avg, ck.exp_avg_sq, [k for k in ck.exp_avg if k in state],
                         os.path.join(tmp, OPTIMIZER))
        tok = meta.get("tokenizer_path")
        if tok and os.path.exists(tok):
            src = os.path.dirname(tok) if os.path.isfile(tok) else tok
            for f in os.listdir(src):
                if f.startswith("tokenizer"):
                    shutil.copy2(os.path.join(src, f), tmp)
    return ck.tag_dir

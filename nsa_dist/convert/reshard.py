"""``reshard``: a checkpoint of any layout -> a layout-free checkpoint that ``nsa-pretrain
--resume`` loads under any TP / Ulysses / DP layout and ZeRO stage.

Source: a training checkpoint of ours (any TP x Ulysses x DP layout, ZeRO 1-3; its fp32 master
weights and Adam's moments are read from the ZeRO shards), or a consolidated directory (with
``optimizer.safetensors`` and ``training_state`` when written by ``consolidate --optimizer``).

Output: a checkpoints root holding the layout-free format (``nsa_dist.checkpoint.full``), so
``--resume OUT`` finds it through ``latest``; written as ``<output_dir>/checkpoints`` it is what
``--resume auto`` picks up. Where the source has no usable optimizer state (a consolidated model without it, a ZeRO-0 run),
``reset_optimizer=True`` must be asked for, and the written metadata and the resuming trainer
both say so. The step, samples consumed and so the LR schedule continue; a resume whose global
batch differs from the source run's is refused unless ``allow_batch_change``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..checkpoint.files import META_FILE, OPTIMIZER, find_tag_dir, read_meta, tag_for_step
from ..checkpoint.full import write_full
from ..checkpoint.tensors import load_moments
from ..config import ModelConfig
from ..fileio import atomic_dir
from .consolidate import check_against_model, global_batch, read_checkpoint
from .io import CONFIG, load_consolidated, note, read_config_json


def _is_consolidated(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG)) and not os.path.isfile(os.path.join(path, META_FILE))


def _config_and_seq_len(src: str) -> tuple[ModelConfig, Optional[int]]:
    """The model config and training length of ``src`` from its metadata alone."""
    if _is_consolidated(src):
        info = read_config_json(src)
        return (ModelConfig.from_dict(info["nsa_dist_model"], where=os.path.join(src, CONFIG)),
                (info.get("training_state") or {}).get("seq_len"))
    tag_dir = find_tag_dir(src)
    meta = read_meta(tag_dir)
    return ModelConfig.from_dict(meta["model_config"], where=f"{tag_dir}/nsa_meta.json"), meta.get("seq_len")


def check_target_layout(cfg: ModelConfig, seq_len: Optional[int], tp: int, sp: int,
                        world_size: Optional[int], cp: int = 1) -> None:
    """ValueError naming the problem when the model cannot be split as asked."""
    from ..parallel.state import ParallelConfig

    world = world_size or tp * sp * cp
    ParallelConfig(tp=tp, sp=sp, cp=cp).check_model(cfg, world, seq_len)


def _check_moments(params: dict, avg: dict, avg_sq: dict, where: str) -> None:
    """Adam's moments must cover every parameter at its shape, in fp32."""
    for moments, what in ((avg, "exp_avg"), (avg_sq, "exp_avg_sq")):
        missing, extra = sorted(params.keys() - moments.keys()), sorted(moments.keys() - params.keys())
        if missing or extra:
            raise ValueError(f"{where}: {what} does not match the weights: missing {missing[:5]}, unexpected {extra[:5]}")
        for k, t in params.items():
            if tuple(moments[k].shape) != tuple(t.shape) or moments[k].dtype != torch.float32:
                raise ValueError(f"{where}: {what}.{k} is {tuple(moments[k].shape)} {moments[k].dtype}, the weight "
                                 f"is {tuple(t.shape)} (moments must be fp32)")


def _read_consolidated(src: str, reset_optimizer: bool, quiet: bool):
    """(cfg, params, moments or None, meta) of a consolidated directory."""
    info = read_config_json(src)
    ts = info.get("training_state")
    has_moments = os.path.isfile(os.path.join(src, OPTIMIZER)) and ts is not None
    if not has_moments and not reset_optimizer:
        raise ValueError(f"{src} is a consolidated model without optimizer state (write it with "
                         "'nsa-convert consolidate --optimizer' to keep Adam's moments); pass --reset-optimizer "
                         "to start training from its weights with a fresh optimizer")
    cfg, params = load_consolidated(src, quiet=quiet)
    check_against_model(params, cfg)
    # Without a recorded position (e.g. a from-hf import) training starts at step 0.
    meta = dict(ts or {"step": 0, "consumed_samples": 0, "adam_step": None})
    meta["model_config"] = cfg.to_dict()
    moments = None
    if has_moments and not reset_optimizer:
        note(f"reading {OPTIMIZER}", quiet)
        avg, avg_sq = load_moments(os.path.join(src, OPTIMIZER))
        _check_moments(params, avg, avg_sq, os.path.join(src, OPTIMIZER))
        moments = (avg, avg_sq, meta.get("adam_step"))
    return cfg, params, moments, meta


def reshard(src: str, out: str, reset_optimizer: bool = False, tp: int = 1, sp: int = 1,
            world_size: Optional[int] = None, force: bool = False, quiet: bool = True,
            allow_batch_change: bool = False, cp: int = 1) -> str:
    """Write the layout-free checkpoint of ``src`` to ``out``; returns its step folder.

    tp, sp, cp, world_size: the target layout the model is checked against before anything is
    written (the checkpoint itself loads on any layout the model splits over).
    """
    if os.path.exists(out) and not force:
        raise FileExistsError(f"output {os.path.abspath(out)} already exists; pass --force to replace it")
    check_target_layout(*_config_and_seq_len(src), tp=tp, sp=sp, world_size=world_size, cp=cp)  # before reading tensors
    if _is_consolidated(src):
        cfg, params, moments, meta = _read_consolidated(src, reset_optimizer, quiet)
        meta["source"] = os.path.abspath(src)
    else:
        ck = read_checkpoint(src, master=True, optimizer=not reset_optimizer, quiet=quiet)
        cfg, params, meta = ck.cfg, ck.params, dict(ck.meta)
        meta["global_batch"] = global_batch(meta)
        meta["source"] = os.path.abspath(ck.tag_dir)
        moments = None if reset_optimizer else (ck.exp_avg, ck.exp_avg_sq, ck.adam_step)
    step = int(meta.get("step", 0))
    names = [n for n in params if not (cfg.tie_embeddings and n == "lm_head.weight")]  # tied: embed.weight
    with atomic_dir(out, force) as tmp:
        note(f"writing {os.path.join(out, tag_for_step(step))}", quiet)
        tag_dir = write_full(tmp, step, params, names, None if moments is None else moments[:2], meta,
                             adam_step=None if moments is None else moments[2],
                             allow_batch_change=bool(allow_batch_change),
                             checked_layout={"tp": tp, "sp": sp, "cp": cp, "world_size": world_size or tp * sp * cp})
    return os.path.join(out, os.path.basename(tag_dir))


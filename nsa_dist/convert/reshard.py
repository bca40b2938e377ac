"""``reshard``: a checkpoint of any layout -> a layout-free checkpoint that ``nsa-pretrain
--resume`` loads under any TP / Ulysses / DP layout and ZeRO stage.

Output (a checkpoints root, so ``--resume OUT`` finds it through ``latest``)::

    OUT/latest                       -> step_XXXXXXXX
    OUT/step_XXXXXXXX/model.safetensors       fp32 weights at single-device names
    OUT/step_XXXXXXXX/optimizer.safetensors   exp_avg.<name>, exp_avg_sq.<name> (fp32), unless reset
    OUT/step_XXXXXXXX/nsa_meta.json           configs, data position, "layout": "full",
                                              "optimizer": "adam" | "reset", file sizes

Adam's moments are elementwise per parameter, so they are cut for the new layout exactly like
the weights; the trainer does that on resume (``nsa_dist.training.full_resume``). Where the source has no
usable optimizer state (a consolidated model, a ZeRO-0 run), ``reset_optimizer=True`` must be
asked for, and the written metadata and the resuming trainer both say so.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ..config import ModelConfig
from .io import CONFIG, atomic_output_dir, load_consolidated

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"


def _is_consolidated(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG)) and not os.path.isfile(os.path.join(path, "nsa_meta.json"))


def check_target_layout(cfg: ModelConfig, tp: int, sp: int, world_size: Optional[int],
                        seq_len: Optional[int]) -> None:
    """ValueError naming the problem when the model cannot be split as asked."""
    from ..parallel.state import ParallelConfig

    world = world_size or tp * sp
    ParallelConfig(tp=tp, sp=sp).check_model(cfg, world, seq_len)


def reshard(src: str, out: str, reset_optimizer: bool = False, tp: int = 1, sp: int = 1,
            world_size: Optional[int] = None, force: bool = False, quiet: bool = False) -> str:
    """Write the layout-free checkpoint of ``src`` to ``out``; returns its step folder."""
    from safetensors.torch import save_file

    from ..training.checkpoint import FORMAT_VERSION, LATEST_FILE, META_FILE, tag_for_step
    from .consolidate import _progress, read_checkpoint

    if os.path.exists(out) and not force:
        raise FileExistsError(f"output {os.path.abspath(out)} already exists; pass --force to replace it")
    if _is_consolidated(src):
        if not reset_optimizer:
            raise ValueError(f"{src} is a consolidated model without optimizer state or data position; "
                             "pass --reset-optimizer to start training from its weights")
        cfg, params = load_consolidated(src)
        from .consolidate import _check_against_model
        _check_against_model(params, cfg)
        meta = {"model_config": cfg.to_dict(), "step": 0, "consumed_samples": 0,
                "source": os.path.abspath(src)}
        moments = None
    else:
        ck = read_checkpoint(src, master=True, optimizer=not reset_optimizer, progress=_progress(quiet))
        cfg, params, meta = ck.cfg, ck.params, dict(ck.meta)
        meta["source"] = os.path.abspath(ck.tag_dir)
        moments = None if reset_optimizer else (ck.exp_avg, ck.exp_avg_sq, ck.adam_step)
    seq_len = meta.get("seq_len")
    check_target_layout(cfg, tp, sp, world_size, seq_len)
    step = int(meta.get("step", 0))
    tag = tag_for_step(step)
    with atomic_output_dir(out, force) as tmp:
        tag_dir = os.path.join(tmp, tag)
        os.makedirs(tag_dir)
        seen, weights = set(), {}
        for name, t in params.items():
            if cfg.tie_embeddings and name == "lm_head.weight":
                continue  # the same tensor as embed.weight
            weights[name] = t.detach().float().contiguous()
            seen.add(name)
        save_file(weights, os.path.join(tag_dir, MODEL_FILE), metadata={"producer": "nsa_dist reshard"})
        if moments is not None:
            avg, avg_sq, adam_step = moments
            save_file({**{f"exp_avg.{k}": avg[k].float().contiguous() for k in seen},
                       **{f"exp_avg_sq.{k}": avg_sq[k].float().contiguous() for k in seen}},
                      os.path.join(tag_dir, OPTIM_FILE), metadata={"producer": "nsa_dist reshard"})
        files = {f: os.path.getsize(os.path.join(tag_dir, f)) for f in sorted(os.listdir(tag_dir))}
        for key in ("param_layout", "world_size", "files", "format_version", "deepspeed_config"):
            meta.pop(key, None)
        meta.update(format_version=FORMAT_VERSION, tag=tag, step=step, layout="full",
                    optimizer="reset" if moments is None else "adam",
                    adam_step=None if moments is None else moments[2], files=files)
        with open(os.path.join(tag_dir, META_FILE), "w") as fh:
            json.dump(meta, fh, indent=2)
        with open(os.path.join(tmp, LATEST_FILE), "w") as fh:
            fh.write(tag + "\n")
    return os.path.join(out, tag)


def load_full(tag_dir: str) -> tuple[dict[str, torch.Tensor], Optional[dict[str, torch.Tensor]],
                                     Optional[dict[str, torch.Tensor]]]:
    """(weights, exp_avg, exp_avg_sq) of a ``reshard`` output folder (moments None when reset)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def read(name):
        try:
            return load_file(os.path.join(tag_dir, name))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"cannot read {os.path.join(tag_dir, name)}: {err}") from err

    weights = read(MODEL_FILE)
    if not os.path.isfile(os.path.join(tag_dir, OPTIM_FILE)):
        return weights, None, None
    opt = read(OPTIM_FILE)
    avg = {k[len("exp_avg."):]: v for k, v in opt.items() if k.startswith("exp_avg.")}
    avg_sq = {k[len("exp_avg_sq."):]: v for k, v in opt.items() if k.startswith("exp_avg_sq.")}
    return weights, avg, avg_sq

"""Load a DeepSpeed JSON from ``configs/deepspeed/`` and reconcile it with the TrainConfig.

The JSON owns ZeRO settings; the TrainConfig owns batch sizes, clipping and precision.
Batch fields and ``gradient_clipping`` may be ``"auto"`` (filled in here) or numbers, which
must then agree with the TrainConfig; a disagreement is a ValueError naming both values.
The optimizer and LR schedule are ours (torch AdamW, warm-up + cosine), so a JSON that
declares its own is rejected rather than silently ignored.
"""
from __future__ import annotations

import copy
import json
import os

from .config import TrainConfig

_OURS = ("optimizer", "scheduler")


def load_ds_json(path: str) -> dict:
    """Parse a DeepSpeed JSON file with a clear error for a missing or malformed file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DeepSpeed config not found: {path} (see configs/deepspeed/)")
    with open(path) as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"DeepSpeed config {path} must hold a JSON object")
    return data


def _agree(ds: dict, key: str, want, path: str) -> None:
    have = ds.get(key, "auto")
    if have == "auto":
        ds[key] = want
    elif have != want:
        raise ValueError(f"{path}: {key}={have!r} disagrees with the train config ({want!r}); "
                         f"set it to \"auto\" or make the two agree")


def resolve_ds_config(ds: dict, cfg: TrainConfig, dp_world_size: int, precision: str,
                      path: str = "deepspeed config") -> dict:
    """A copy of ``ds`` with every "auto" filled and the batch sizes checked.

    precision: "bf16" or "fp32" (already resolved for the device).
    """
    ds = copy.deepcopy(ds)
    for key in _OURS:
        if key in ds:
            raise ValueError(f"{path}: remove the '{key}' section; nsa-pretrain uses torch AdamW "
                             f"with its own warm-up + cosine schedule (set lr etc. in the train YAML)")
    _agree(ds, "train_micro_batch_size_per_gpu", cfg.micro_batch_size, path)
    _agree(ds, "gradient_accumulation_steps", cfg.grad_accum_steps, path)
    _agree(ds, "train_batch_size", cfg.global_batch(dp_world_size), path)
    _agree(ds, "gradient_clipping", float(cfg.grad_clip), path)
    if "fp16" in ds and ds["fp16"].get("enabled", False) not in (False, "auto"):
        raise ValueError(f"{path}: fp16 is not supported (use precision: bf16 in the train YAML)")
    ds.pop("fp16", None)
    bf16 = ds.setdefault("bf16", {})
    enabled = bf16.get("enabled", "auto")
    if enabled != "auto" and bool(enabled) != (precision == "bf16"):
        raise ValueError(f"{path}: bf16.enabled={enabled} disagrees with the run's precision "
                         f"'{precision}'; set it to \"auto\"")
    bf16["enabled"] = precision == "bf16"
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    ds.setdefault("steps_per_print", 10**9)  # our progress line replaces DeepSpeed's
    ds.setdefault("wall_clock_breakdown", False)
    # The CPU build of torch has no fused/foreign optimizer; this stops DeepSpeed from
    # refusing a client optimizer it does not know under ZeRO.
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))

"""Adam's moments of a layout-free checkpoint (``nsa-convert reshard`` output) into this
run's DeepSpeed optimizer.

The weights went into the model before DeepSpeed wrapped it (``checkpoint.full.load_weights``:
fp32 masters and ZeRO partitions start from them). Each rank cuts the moments like the weights
(``checkpoint.layout.local_slices``) and, after ``deepspeed.initialize``, writes them through
DeepSpeed's fragment API (ZeRO 1-3, bf16) or directly into a plain torch optimizer.
"""
from __future__ import annotations

import torch

from ..checkpoint.full import load_full
from ..checkpoint.layout import local_slices


def _materialise_adam_state(zero_opt, base, adam_step: float) -> None:
    """ZeRO makes Adam's state lazily at the first step: make it now (zero) on the optimizer's
    flat fp32 partitions, so the fragment API has something to fill."""
    flats = getattr(zero_opt, "fp32_partitioned_groups_flat", None)  # ZeRO-3 (absent from groups between steps)
    fused = any(bool(g.get("fused")) for g in base.param_groups)
    for flat_list in ([flats] if flats is not None else [g["params"] for g in base.param_groups]):
        for flat in flat_list:
            st = base.state.setdefault(flat, {})
            st.setdefault("step", torch.tensor(adam_step, dtype=torch.float32,
                                               device=flat.device if fused else "cpu"))
            for key in ("exp_avg", "exp_avg_sq"):
                if key not in st:
                    st[key] = torch.zeros_like(flat)
    if hasattr(zero_opt, "_lazy_init_hp_params_optimizer_state"):
        zero_opt._lazy_init_hp_params_optimizer_state()


def load_optimizer(engine, path: str, adam_step: float, tied: bool) -> bool:
    """Adam's moments and step into ``engine``'s optimizer; False when the checkpoint has none
    (written with --reset-optimizer)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    _, avg, avg_sq = load_full(path)
    if avg is None:
        return False
    zero_opt = engine.optimizer
    base = getattr(zero_opt, "optimizer", zero_opt)
    if base is not zero_opt:
        _materialise_adam_state(zero_opt, base, adam_step)
    module = engine.module
    for (p, m1), (_, m2) in zip(local_slices(module, avg, tied, path), local_slices(module, avg_sq, tied, path)):
        if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):
            safe_set_full_optimizer_state(p, m1.to(p.device), "exp_avg")
            safe_set_full_optimizer_state(p, m2.to(p.device), "exp_avg_sq")
        else:  # no ZeRO, fp32: the torch optimizer holds the parameters themselves
            base.state[p] = {"step": torch.tensor(adam_step), "exp_avg": m1.to(p).clone(),
                             "exp_avg_sq": m2.to(p).clone()}
    for st in base.state.values():
        if "step" in st:
            st["step"] = torch.full_like(st["step"], adam_step) if torch.is_tensor(st["step"]) else adam_step
    return True

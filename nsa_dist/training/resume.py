"""Where a run starts: afresh, from a DeepSpeed checkpoint of this layout, or from a
layout-free one (``nsa-convert reshard`` output, any layout).

    plan_resume(env, data, resume)        -> ResumePlan | None   found and checked against the
                                                                 run before anything heavy is built
    build(env, plan.record(..), plan.full_weights)               (build.py) the optimizer in the
                                                                 checkpoint's parameter order
    load_resume(env, built, plan, ckpt)   -> Position            state into the engine

A DeepSpeed checkpoint loads through DeepSpeed; when its layout record names the parameters
otherwise than the live model (checkpoints of the parallel twin classes), the module state is
renamed through the record (``nsa_dist.checkpoint.layout``). A layout-free checkpoint's
weights go into the model before DeepSpeed wraps it (fp32 masters and ZeRO partitions start
from them); each rank then cuts Adam's moments like the weights and writes them through
DeepSpeed's fragment API (ZeRO 1-3, bf16) or directly into a plain torch optimizer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..checkpoint.files import LATEST_FILE, read_meta
from ..checkpoint.full import load_full
from ..checkpoint.layout import local_layout, local_slices, rename_state_dict, renames
from .build import Built, Data, Env
from .checkpoint import CheckpointManager, check_compatible, find_resume_checkpoint
from .schedule import Schedule


@dataclass
class Position:
    """How far the run is: optimizer steps done, samples consumed, the step saved last."""
    step: int = 0
    consumed_samples: int = 0
    last_saved: int = -1


@dataclass(frozen=True)
class ResumePlan:
    path: str  # the checkpoint folder
    meta: dict  # its metadata, checked against this run

    @property
    def full(self) -> bool:
        """A layout-free checkpoint (loads on any layout)."""
        return self.meta.get("layout") == "full"

    @property
    def full_weights(self) -> Optional[str]:
        return self.path if self.full else None

    def record(self, tp_rank: int) -> Optional[dict]:
        """TP rank ``tp_rank``'s layout record of a DeepSpeed checkpoint (None: layout-free,
        or written without tensor / sequence parallelism)."""
        layouts = None if self.full else self.meta.get("param_layout")
        return layouts[tp_rank] if layouts else None


def _restart_count() -> int:
    """How often torchrun restarted this worker group after a failure (0: the first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def resume_arg(resume: Optional[str]) -> Optional[str]:
    """``--resume`` as given; without one, a worker that torchrun restarted after a failure
    resumes ``auto``: from the newest good checkpoint."""
    return "auto" if resume is None and _restart_count() > 0 else resume


def choose_checkpoint(resume: Optional[str], root: str, warn) -> Optional[str]:
    """``find_resume_checkpoint(resume, root)``, but a restarted worker continues from the
    newest good checkpoint of this run when there is one, whatever ``--resume`` named (the
    first attempt may have started from another folder, or from nothing)."""
    if _restart_count() > 0 and resume != "auto":
        found = find_resume_checkpoint("auto", root, warn)
        if found is not None:
            warn(f"[resume] restart {_restart_count()} by the launcher: continuing this run from {found}")
            return found
    return find_resume_checkpoint(resume, root, warn)


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def plan_resume(env: Env, data: Data, resume: Optional[str]) -> Optional[ResumePlan]:
    """The checkpoint to resume from, checked against this run before anything heavy is
    built (a bad path or an incompatible checkpoint fails in seconds)."""
    cfg, root = env.cfg, checkpoints_dir(env.cfg.output_dir)
    path = _find_on_rank0(env, resume, root)
    if path is None:
        if resume == "auto":
            env.progress.print(f"[resume] no checkpoint under {root}: starting fresh")
        elif os.path.isfile(os.path.join(root, LATEST_FILE)):
            # A fresh run would mix its checkpoints with the old run's.
            raise ValueError(f"{cfg.output_dir} already holds checkpoints of another run; "
                             f"pass --resume auto to continue it, or choose a new output_dir")
        return None
    plan = ResumePlan(path, read_meta(path))
    meta = plan.meta
    for w in check_compatible(meta, env.model_cfg.to_dict(), data.tokenizer_sha, cfg.data_prefix,
                              cfg.seq_len, env.world_size, layout=env.layout):
        env.progress.print(f"[resume] warning: {w}")
    consumed, per_round = int(meta["consumed_samples"]), cfg.micro_batch_size * env.dp_world
    if plan.full:  # nsa-convert reshard output: any layout
        if consumed % per_round:
            raise ValueError(f"checkpoint {path}: consumed_samples={consumed} is not a multiple of "
                             f"micro_batch_size x data-parallel size = {per_round}; choose sizes that "
                             f"divide it to continue the same sample order")
        _check_full_global_batch(env, path, meta)
    else:
        tc = meta.get("train_config") or {}
        for key in ("micro_batch_size", "grad_accum_steps"):
            if key in tc and tc[key] != getattr(cfg, key):
                raise ValueError(f"checkpoint {path}: {key}={tc[key]}, this run {getattr(cfg, key)}; "
                                 f"keep micro_batch_size and grad_accum_steps when resuming (or "
                                 f"convert it with 'nsa-convert reshard')")
    return plan


def _find_on_rank0(env: Env, resume: Optional[str], root: str) -> Optional[str]:
    """``choose_checkpoint`` on rank 0 (it reads every file for the checksums), its answer or
    error handed to all ranks."""
    if env.world_size == 1:
        return choose_checkpoint(resume, root, env.progress.print)
    import torch.distributed as dist

    box: list = [None, None]
    if env.rank == 0:
        try:
            box[0] = choose_checkpoint(resume, root, env.progress.print)
        except (FileNotFoundError, ValueError) as err:
            box[1] = (isinstance(err, FileNotFoundError), str(err))
    dist.broadcast_object_list(box, src=0, device=env.device)
    if box[1] is not None:
        raise (FileNotFoundError if box[1][0] else ValueError)(box[1][1])
    return box[0]


def _check_full_global_batch(env: Env, path: str, meta: dict) -> None:
    """A resharded checkpoint continues its step, data position and LR schedule; another
    global batch (new DP size) would change what a step means, so it must be asked for
    when resharding (``nsa-convert reshard --allow-batch-change``)."""
    cfg = env.cfg
    then, now = meta.get("global_batch"), cfg.global_batch(env.dp_world)
    if not then or then == now:
        return
    sizes = (f"micro_batch_size {cfg.micro_batch_size} x grad_accum_steps "
             f"{cfg.grad_accum_steps} x data-parallel size {env.dp_world}")
    if not meta.get("allow_batch_change"):
        raise ValueError(f"checkpoint {path} was trained with a global batch of {then} samples, this run "
                         f"has {now} ({sizes}); choose sizes that keep {then}, or reshard with "
                         f"'nsa-convert reshard --allow-batch-change' to continue with {now}")
    env.progress.print(f"[resume] global batch {then} -> {now} samples ({sizes}), allowed by reshard "
                       f"--allow-batch-change: step, data position and LR schedule continue")


def plan_schedule(env: Env, plan: Optional[ResumePlan]) -> Schedule:
    """The LR schedule of this run, said in one line: this config's, or on resume, when the
    checkpoint's differs (e.g. a larger ``train_steps``), the one ``schedule_on_resume`` picks."""
    cfg, say = env.cfg, env.progress.print
    new = Schedule.from_train_config(cfg)
    old = None
    if plan is not None:
        if plan.meta.get("lr_schedule"):
            old = Schedule.from_dict(plan.meta["lr_schedule"])
        elif plan.meta.get("train_config"):  # checkpoints older than the record
            old = Schedule.from_train_config({**cfg.to_dict(), **plan.meta["train_config"]})
    if old is None or old == new:
        say(f"[schedule] {new.describe()}" + (" (as in the checkpoint)" if old else ""))
        return new
    step = int(plan.meta["step"])
    if cfg.schedule_on_resume == "keep":
        say(f"[schedule] schedule_on_resume=keep: the checkpoint's schedule continues ({old.describe()}); "
            f"this config's would be {new.describe()} (lr {new(step):.2e} instead of {old(step):.2e} at "
            f"step {step}); set schedule_on_resume=replan to use it")
        return old
    say(f"[schedule] schedule_on_resume=replan: {new.describe()}, replacing the checkpoint's "
        f"({old.describe()}); lr at step {step}: {old(step):.2e} -> {new(step):.2e}")
    return new


def load_resume(env: Env, built: Built, plan: Optional[ResumePlan], ckpt: CheckpointManager) -> Position:
    """Load ``plan``'s state into ``built.engine``; where the run starts."""
    if plan is None:
        return Position()
    meta = _load_full_optimizer(env, built, plan) if plan.full else _load_deepspeed(env, built, plan, ckpt)
    step = int(meta["step"])
    pos = Position(step, int(meta["consumed_samples"]), last_saved=step)
    env.progress.print(f"[resume] loaded {plan.path} (step {pos.step}, "
                       f"{pos.consumed_samples} samples consumed)")
    return pos


def _load_deepspeed(env: Env, built: Built, plan: ResumePlan, ckpt: CheckpointManager) -> dict:
    """DeepSpeed's load; the module state renamed when the checkpoint's record names the
    parameters otherwise (the optimizer already holds them in the record's order)."""
    record, load_fn = plan.record(env.tp_rank), None
    if record is not None:
        mapping = renames(record, local_layout(built.engine.module), plan.path)
        moved = sum(old != new for old, new in mapping.items())
        if moved:
            env.progress.print(f"[resume] {plan.path}: {moved} parameter names mapped to this model's "
                               f"through the checkpoint's param_layout")

            def load_fn(src, dst):
                dst.load_state_dict(rename_state_dict(src, mapping, dst), strict=True)
    return ckpt.load(built.engine, plan.path, custom_load_fn=load_fn)


def _load_full_optimizer(env: Env, built: Built, plan: ResumePlan) -> dict:
    """Adam state of a resharded checkpoint (the weights are already in); returns its metadata."""
    path, meta = plan.path, plan.meta
    adam_step = float(meta.get("adam_step") or meta["step"])
    if meta.get("optimizer") == "reset" or not load_optimizer(
            built.engine, path, adam_step, env.model_cfg.tie_embeddings):
        env.progress.print(f"[resume] {path}: weights only; the optimizer state was RESET by "
                           f"'nsa-convert reshard --reset-optimizer' (Adam starts afresh)")
        return meta
    built.engine.global_steps = int(meta["step"])
    tp, sp, cp = env.layout
    env.progress.print(f"[resume] {path}: weights and Adam state cut for this layout "
                       f"(tp={tp}, sp={sp}, cp={cp}, dp={env.dp_world}); RNG states start from the seed")
    return meta


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
    """Adam's moments and step of the layout-free checkpoint ``path`` into ``engine``'s
    optimizer; False when the checkpoint has none (written with --reset-optimizer)."""
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

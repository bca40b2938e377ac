"""The pretraining run of one process, assembled from its parts:

    build.py    device, process groups, data, model, optimizer, DeepSpeed engine
    resume.py   which checkpoint to continue (DeepSpeed or layout-free) and loading it
    loop.py     steps, evaluation, checkpoints, time limit
    report.py   progress line, TensorBoard, history, summary.json

Each part hands the next an explicit bundle (``Env``, ``Data``, ``ResumePlan``, ``Built``,
``Position``); nothing depends on the order attributes were set in.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from .build import build, load_data, start
from .checkpoint import CheckpointManager
from .config import TrainConfig
from .loop import TrainLoop
from .report import Report
from .resume import checkpoints_dir, load_resume, plan_resume, plan_schedule


def _agree(env) -> Callable[[bool], bool]:
    """agree(ok): True when ``ok`` holds on every rank (an all-reduce, so also a barrier)."""
    def agree(ok: bool) -> bool:
        flag = torch.tensor([1.0 if ok else 0.0], device=env.device)
        if env.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)
    return agree


def _gather(env) -> Callable[[object], list]:
    """gather(obj): every rank's ``obj`` in rank order (an all-gather of picklable objects)."""
    def gather(obj) -> list:
        if env.world_size == 1:
            return [obj]
        out: list = [None] * env.world_size
        dist.all_gather_object(out, obj)
        return out
    return gather


class Trainer:
    """Builds everything from a TrainConfig and runs ``train()``; every rank makes one.

    resume: None / "none", "auto" or a checkpoint path (``checkpoint.find_resume_checkpoint``);
    parallel_state: a prebuilt ``ParallelState`` (else made from ``cfg.parallel``).
    """

    def __init__(self, cfg: TrainConfig, resume: Optional[str] = None, log_all_ranks: bool = False,
                 parallel_state=None):
        self.env = env = start(cfg, parallel_state, log_all_ranks)
        self.data = load_data(env)
        plan = plan_resume(env, self.data, resume)  # checked before anything heavy is built
        self.built = build(env, plan.record(env.tp_rank) if plan else None, plan.full_weights if plan else None)
        ckpt = CheckpointManager(checkpoints_dir(cfg.output_dir), env.rank, env.world_size, dist.barrier,
                                 keep=cfg.keep_checkpoints, log=env.progress.print, agree=_agree(env),
                                 gather=_gather(env))
        pos = load_resume(env, self.built, plan, ckpt)
        self.report = Report(env, start_step=pos.step)
        self.loop = TrainLoop(env, self.data, self.built, pos, self.report, ckpt, plan_schedule(env, plan))

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def engine(self):
        return self.built.engine

    def train(self) -> dict:
        """Run to ``train_steps`` (or ``max_minutes``); the summary (see ``Report.summary``)."""
        return self.loop.train()

    def evaluate(self) -> float:
        return self.loop.evaluate()

    def save(self) -> str:
        return self.loop.save()

    def close(self) -> None:
        self.report.close()

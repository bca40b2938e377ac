"""The training loop over a built run: batches, steps, evaluation, checkpoints, time limit."""
from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from ..checkpoint.files import tag_for_step
from .build import Built, Data, Env
from .checkpoint import CheckpointManager
from .exits import EXIT_PREEMPTED, Preempted
from .metrics import mfu_peak, step_rate
from .report import Report
from .resume import Position
from .schedule import Schedule, schedule_from_config
from .stop import StopRequest


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch`` on ``device``, but cu_seqlens: the attention reads its values on the host
    (validation, launch geometry), and a device copy would make every layer wait for the GPU;
    a single document needs none."""
    out = {k: (v if k == "cu_seqlens" else v.to(device, non_blocking=True)) for k, v in batch.items()}
    if batch["cu_seqlens"].numel() == 2 and batch["input_ids"].shape[0] == 1:
        out["cu_seqlens"] = None  # one document: nothing to keep apart
    return out


@torch.no_grad()
def check_finite(loss: float, grad_norm: Optional[float], step: int) -> None:
    """Stop the run at a non-finite loss or gradient norm, before anything is saved.

    The DeepSpeed configs turn off bf16's per-gradient overflow check (a few kernels per
    parameter tensor and a host sync before the optimizer, every step); DeepSpeed's gradient
    norm still sees every gradient and reports a non-finite one as -1 (its sentinel). The step
    has then been applied, so the weights in memory are not to be trusted: raise, and resume
    from the last checkpoint."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}; lower lr or check data")
    if grad_norm is not None and (not math.isfinite(grad_norm) or grad_norm < 0):
        raise FloatingPointError(
            f"gradient norm is {'not finite' if grad_norm < 0 else grad_norm} at step {step}: this step's update "
            f"is not trusted and nothing was saved; resume from the last checkpoint (--resume auto) with a lower "
            f"lr, or check the data")


def _grad_norm(model: torch.nn.Module) -> float:
    """L2 norm of all gradients (each shared parameter once)."""
    grads = {id(p): p.grad for p in model.parameters() if p.grad is not None}
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads.values()])))


class TrainLoop:
    """Runs a built model from ``pos`` to ``cfg.train_steps``; every rank makes one."""

    def __init__(self, env: Env, data: Data, built: Built, pos: Position, report: Report,
                 ckpt: CheckpointManager, schedule: Optional[Schedule] = None):
        self.env, self.cfg, self.data, self.built = env, env.cfg, data, built
        self.engine, self.pos, self.report, self.ckpt = built.engine, pos, report, ckpt
        self.schedule = schedule or schedule_from_config(env.cfg)  # resume.plan_schedule decides
        self.stop = StopRequest()

    # ------------------------------------------------------------------ pieces
    def _mean_over_dp(self, values: list[float]) -> list[float]:
        # On the run's device: NCCL reduces only CUDA tensors.
        t = torch.tensor(values, dtype=torch.float64, device=self.env.device)
        if self.env.world_size > 1:
            dist.all_reduce(t)
            t /= self.env.world_size
        return t.tolist()

    def _plain_grad_norm(self, model: torch.nn.Module) -> float:
        """Global gradient norm without ZeRO's help (ZeRO-0); TP shards counted once each."""
        if self.env.replica_size > 1:
            from ..parallel import grad_norm
            return float(grad_norm(model, self.env.parallel_state))
        return _grad_norm(model)

    def _should_stop_for_time(self, start: float) -> bool:
        if self.cfg.max_minutes <= 0:
            return False
        flag = torch.tensor([float(time.perf_counter() - start > 60 * self.cfg.max_minutes)],
                            device=self.env.device)
        if self.env.world_size > 1:
            dist.broadcast(flag, src=0)  # rank 0's clock decides, so all ranks stop together
        return bool(flag.item())

    def _set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over ``eval_batches`` micro-batches per rank of the valid split."""
        from ..data import build_dataloader

        cfg, env = self.cfg, self.env
        per_round = cfg.micro_batch_size * env.dp_world
        n = min(cfg.eval_batches or 1, max(1, len(self.data.valid) // per_round))
        loader = iter(build_dataloader(self.data.valid, cfg.micro_batch_size, env.dp_rank, env.dp_world))
        self.engine.eval()
        total, count = 0.0, 0.0
        for _ in range(n):
            b = to_device(next(loader), env.device)
            out = self.engine(b["input_ids"], labels=b["labels"], cu_seqlens=b["cu_seqlens"])
            tokens = float((b["labels"] != -100).sum())
            total += float(out.loss) * tokens
            count += tokens
        self.engine.train()
        t = torch.tensor([total, count], dtype=torch.float64, device=env.device)
        if env.world_size > 1:
            dist.all_reduce(t)
        return float(t[0] / max(t[1], 1.0))

    def _log_eval(self) -> float:
        loss = self.evaluate()
        self.report.eval(self.pos.step, loss)
        return loss

    def _meta(self) -> dict:
        """What a checkpoint records beside DeepSpeed's files (``nsa_meta.json``)."""
        import deepspeed

        env, cfg, built, pos = self.env, self.cfg, self.built, self.pos
        return {"model_config": env.model_cfg.to_dict(), "train_config": cfg.to_dict(),
                "deepspeed_config": built.ds_config, "tokenizer_path": self.data.tokenizer_path,
                "tokenizer_sha256": self.data.tokenizer_sha, "data_prefix": cfg.data_prefix,
                "seq_len": cfg.seq_len, "consumed_samples": pos.consumed_samples,
                "global_batch": cfg.global_batch(env.dp_world),
                "tokens_seen": pos.consumed_samples * cfg.seq_len,
                "param_layout": built.param_layout, "lr_schedule": self.schedule.to_dict(),
                "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__}}

    def save(self) -> str:
        path = self.ckpt.save(self.engine, self.pos.step, self._meta())
        self.pos.last_saved = self.pos.step
        self.env.progress.print(f"[checkpoint] step {self.pos.step} -> {path}")
        return path

    def _saved_or_save(self):
        """This step's checkpoint folder, written now unless it was (None: saving is off)."""
        if not self.cfg.save_checkpoints:
            return None
        if self.pos.last_saved != self.pos.step:
            return self.save()
        return os.path.join(self.ckpt.root, tag_for_step(self.pos.step))

    def _stop_for_signal(self) -> None:
        """Every rank saw a stop request after this step: save it and raise ``Preempted``."""
        path = self._saved_or_save()
        self.env.progress.close()
        self.env.progress.print(f"[stop] {self.stop.name} at step {self.pos.step}: checkpoint {path}; "
                                f"exiting with status {EXIT_PREEMPTED} (continue with --resume auto)")
        raise Preempted(self.stop.name, self.pos.step, path)

    # ------------------------------------------------------------------ the loop
    def _step(self, loader, want_stats: bool) -> tuple:
        """One optimizer step over ``grad_accum_steps`` micro-batches: (loss averaged over the
        ranks, gradient norm, attention stats of the first micro-batch or None, its cu_seqlens,
        whether any rank was asked to stop)."""
        cfg, engine = self.cfg, self.engine
        stats, stats_cu, fallback_norm, losses = None, None, None, []
        for micro in range(cfg.grad_accum_steps):
            b = to_device(next(loader), self.env.device)
            out = engine(b["input_ids"], labels=b["labels"], cu_seqlens=b["cu_seqlens"],
                         return_stats=want_stats and micro == 0)
            engine.backward(out.loss)
            if micro == cfg.grad_accum_steps - 1 and self.built.zero_stage == 0:
                # ZeRO-0 reports no norm; its gradients are plain, averaged, unclipped here.
                fallback_norm = self._plain_grad_norm(engine.module)
            engine.step()
            losses.append(out.loss.detach())
            if out.stats:
                stats, stats_cu = out.stats, b["cu_seqlens"]
        # The stop request rides on the loss's all-reduce: all ranks stop after the same step.
        loss, stop = self._mean_over_dp([float(torch.stack(losses).float().mean()), float(self.stop.requested)])
        grad_norm = engine.get_global_grad_norm()
        return loss, float(grad_norm) if grad_norm is not None else fallback_norm, stats, stats_cu, stop > 0

    def train(self) -> dict:
        """Run until ``train_steps`` (or ``max_minutes``); evaluates and saves at the end.
        Returns the summary (rank 0's numbers; the same dict on every rank). A stop signal
        (``stop.py``) ends the run after the current step with a checkpoint: ``Preempted``."""
        from .peers import Heartbeat

        self.stop.install()
        beat = Heartbeat(self.env.rank, self.env.world_size,
                         silence_s=min(60.0, self.cfg.collective_timeout_s / 2)).start()
        try:
            return self._train()
        finally:
            beat.stop()
            self.stop.restore()

    def _train(self) -> dict:
        from ..data import build_dataloader

        cfg, env, built, pos, report = self.cfg, self.env, self.built, self.pos, self.report
        loader = iter(build_dataloader(self.data.train, cfg.micro_batch_size, env.dp_rank,
                                       env.dp_world, consumed_samples=pos.consumed_samples))
        peak, peak_line = mfu_peak(env.device, built.precision, cfg.peak_tflops)
        env.progress.print(peak_line)
        # Tokens per GPU: the ranks of one TP x Ulysses group share the same samples.
        clock = _Throughput(cfg.micro_batch_size * cfg.grad_accum_steps * cfg.seq_len / env.replica_size)
        env.progress.print(
            f"[train] {built.num_parameters / 1e6:.2f}M parameters, {env.world_size} rank(s) on "
            f"{env.device.type}, ZeRO-{built.zero_stage}, {built.precision}, global batch "
            f"{cfg.global_batch(env.dp_world)} x {cfg.seq_len} tokens, steps {pos.step}->{cfg.train_steps}")
        start = time.perf_counter()
        env.progress.start(pos.step)
        clock.reset_window()
        first_step = pos.step
        self.engine.train()
        while pos.step < cfg.train_steps:
            step_start = time.perf_counter()
            lr = self.schedule(pos.step)
            self._set_lr(lr)
            log_now = (pos.step + 1) % cfg.log_every == 0 or pos.step == first_step
            image_now = bool(cfg.image_every) and ((pos.step + 1) % cfg.image_every == 0
                                                   or pos.step == first_step)
            loss, grad_norm, stats, stats_cu, stop = self._step(loader, log_now or image_now)
            pos.step += 1
            pos.consumed_samples += cfg.global_batch(env.dp_world)
            check_finite(loss, grad_norm, pos.step)
            report.step(pos.step, loss, lr, grad_norm)
            clock.stepped(step_start, steady=pos.step > first_step + 1)  # the first pays warm-up costs
            if stats and image_now:
                report.selected_blocks(stats, stats_cu, pos.step)
            if log_now or pos.step == cfg.train_steps:
                rate = clock.window_rate(built.flops_per_token, peak)
                report.window(pos.step, loss, lr, rate, stats if log_now else None, built.comm_stats)
                clock.reset_window()
                if built.comm_stats is not None:
                    built.comm_stats.reset()
            if stop:
                self._stop_for_signal()
            if (cfg.eval_batches and cfg.eval_every and pos.step % cfg.eval_every == 0
                    and pos.step < cfg.train_steps):
                self._log_eval()
            if (cfg.save_checkpoints and cfg.save_every and pos.step % cfg.save_every == 0
                    and pos.step < cfg.train_steps):
                self.save()
            if self._should_stop_for_time(start):
                env.progress.print(f"[train] max_minutes={cfg.max_minutes} reached at step {pos.step}")
                break
        train_time = time.perf_counter() - start
        env.progress.close()
        eval_loss = self._log_eval() if cfg.eval_batches else None
        ckpt = self._saved_or_save()
        return report.summary(built, pos.step, pos.consumed_samples * cfg.seq_len, train_time, clock.steady_tokens,
                              clock.steady_time, max(0, pos.step - first_step - 1), eval_loss, ckpt, peak)


class _Throughput:
    """Tokens and seconds of the current log window and of the steady state (every step after
    the run's first, which pays compilation and warm-up)."""

    def __init__(self, tokens_per_step: float):
        self.tokens_per_step = tokens_per_step
        self.steady_tokens, self.steady_time = 0, 0.0
        self.reset_window()

    def reset_window(self) -> None:
        self.window_start, self.window_steps = time.perf_counter(), 0

    def stepped(self, step_start: float, steady: bool) -> None:
        self.window_steps += 1
        if steady:
            self.steady_tokens += self.tokens_per_step
            self.steady_time += time.perf_counter() - step_start

    def window_rate(self, flops_per_token: float, peak):
        """``metrics.step_rate`` of the window so far."""
        return step_rate(self.tokens_per_step * self.window_steps, time.perf_counter() - self.window_start,
                         flops_per_token, peak)

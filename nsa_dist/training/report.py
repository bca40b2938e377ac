"""What a run reports: the progress line, TensorBoard (rank 0), the history of its numbers and
the final summary (``<output_dir>/summary.json``)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..fileio import atomic_open
from .build import Built, Env
from .metrics import memory_gb


@dataclass
class History:
    """What rank 0 reports at the end (also written to ``summary.json``)."""

    losses: list = field(default_factory=list)  # (step, loss)
    eval_losses: list = field(default_factory=list)  # (step, loss)
    tokens_per_s: list = field(default_factory=list)  # per rank, per log window
    tflops: list = field(default_factory=list)
    mfu: list = field(default_factory=list)


def _longest_document(selected: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Rows of ``selected`` [S, n] for the longest packed document (block ids count from
    each document's start, so one document makes a readable image)."""
    cu = cu_seqlens.tolist()
    i = max(range(len(cu) - 1), key=lambda j: cu[j + 1] - cu[j])
    return selected[cu[i]:cu[i + 1]]


class Report:
    """The run's numbers as they come: ``step`` every optimizer step, ``window`` at each log
    step, ``eval``; ``summary`` at the end. TensorBoard only on rank 0 (when configured)."""

    def __init__(self, env: Env, start_step: int = 0):
        self.env, self.cfg, self.progress = env, env.cfg, env.progress
        self.history = History()
        self.tb = None
        if self.cfg.tensorboard and env.rank == 0:
            from .tensorboard import TBLogger
            # Resumed at start_step: the steps after it that an earlier attempt logged are
            # replayed now, so TensorBoard drops its events from start_step + 1 on.
            self.tb = TBLogger(os.path.join(self.cfg.output_dir, "tensorboard"),
                               purge_step=start_step + 1 if start_step > 0 else None)

    def step(self, step: int, loss: float, lr: float, grad_norm: Optional[float]) -> None:
        self.history.losses.append((step, loss))
        if self.tb:
            self.tb.scalars({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm}, step)

    def selected_blocks(self, stats: list, cu_seqlens: Optional[torch.Tensor], step: int) -> None:
        """The image of the configured layer's selected blocks (its longest document)."""
        layer = self.cfg.image_layer
        if self.tb and stats and layer < len(stats):
            sel = stats[layer].selected_blocks
            self.tb.blocks_image(sel if cu_seqlens is None else _longest_document(sel, cu_seqlens),
                                 self.env.model_cfg.nsa.sel_block, layer, step)

    def window(self, step: int, loss: float, lr: float, rate, stats: Optional[list], comm_stats) -> None:
        """A log step: throughput of the window (``metrics.step_rate``), memory, the attention
        statistics of ``stats`` and the communication volume since the last log."""
        h = self.history
        h.tokens_per_s.append(rate.tokens_per_s)
        h.tflops.append(rate.tflops)
        h.mfu.append(rate.mfu)
        if self.tb:
            self.tb.scalars({"perf/tokens_per_s_per_gpu": rate.tokens_per_s,
                             "perf/tflops_per_gpu": rate.tflops, "perf/mfu": rate.mfu}, step)
            self.tb.scalars({f"mem/{k}": v for k, v in memory_gb(self.env.device).items()}, step)
            if stats:
                self.tb.attention_stats(stats, step)
            if comm_stats is not None:  # bytes per layer and collective since the last log
                self.tb.scalars(comm_stats.scalars(), step)
            self.tb.flush()
        mfu = f" MFU {rate.mfu:.2%}" if rate.mfu is not None else ""
        self.progress.update(step, loss, rate.tokens_per_s, f" lr {lr:.2e}{mfu}")

    def eval(self, step: int, loss: float) -> None:
        self.history.eval_losses.append((step, loss))
        if self.tb:
            self.tb.scalars({"eval/loss": loss}, step)
            self.tb.flush()
        self.progress.print(f"[eval] step {step} valid loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.1f})")

    def summary(self, built: Built, steps: int, tokens_seen: int, train_time: float, steady_tokens: float,
                steady_time: float, steady_steps: int, eval_loss: Optional[float], ckpt: Optional[str],
                peak: Optional[float]) -> dict:
        """The run's summary (rank 0's numbers; the same dict on every rank); rank 0 writes it
        to ``summary.json``. Throughput: the steady state, every step after the first (which
        pays compilation and warm-up)."""
        env, cfg, h = self.env, self.cfg, self.history
        tps = steady_tokens / steady_time if steady_time > 0 else (h.tokens_per_s[-1] if h.tokens_per_s else 0.0)
        tp, sp, cp = env.layout
        summary = {
            "steps": steps, "ranks": env.world_size, "device": env.device.type,
            "zero_stage": built.zero_stage, "precision": built.precision,
            "loss_first": h.losses[0][1] if h.losses else None,
            "loss_last": h.losses[-1][1] if h.losses else None,
            "loss_curve": h.losses,
            "eval_loss": eval_loss, "eval_curve": h.eval_losses,
            "tokens_per_s_per_rank": tps, "tokens_per_s_total": tps * env.world_size,
            "tflops_per_rank": tps * built.flops_per_token / 1e12,
            "mfu": (tps * built.flops_per_token / 1e12 / peak) if peak else None,
            "train_seconds": train_time, "tokens_seen": tokens_seen,
            "seconds_per_step": steady_time / steady_steps if steady_steps else None,
            "flops_per_token": built.flops_per_token, "num_parameters": built.num_parameters,
            "attention": env.model_cfg.attention, "seq_len": cfg.seq_len,
            "micro_batch_size": cfg.micro_batch_size,
            "layout": {"tp": tp, "sp": sp, "cp": cp, "dp": env.dp_world},
            "peak_memory_gb": max(memory_gb(env.device).values()),  # CUDA peak, or peak RSS on CPU
            "checkpoint": os.path.abspath(ckpt) if ckpt else None,
            "tensorboard": os.path.abspath(os.path.join(cfg.output_dir, "tensorboard")),
        }
        if env.rank == 0:  # the folder is made if no checkpoint or TensorBoard made it
            import json

            with atomic_open(os.path.join(cfg.output_dir, "summary.json")) as fh:
                json.dump(summary, fh, indent=2)
        return summary

    def close(self) -> None:
        if self.tb:
            self.tb.close()

"""The pretraining loop: model from YAML, DeepSpeed engine, packed data, eval, checkpoints.

One ``Trainer`` per process. Data parallelism comes from the launcher (``RANK``,
``WORLD_SIZE``, ... set by torchrun or the deepspeed launcher); a single process without
a launcher runs as a world of one. Tensor/sequence parallel layouts plug in through
``parallel_state`` (a ``nsa_dist.parallel.ParallelState``): it decides the data-parallel
rank that picks the batches and is handed to DeepSpeed as ``mpu``; the model still has
to be parallelised by that helper before ``deepspeed.initialize`` (see ``_build_model``).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import ModelConfig
from .checkpoint import CheckpointManager, check_compatible, find_resume_checkpoint, read_meta
from .config import TrainConfig
from .ds_config import load_ds_json, resolve_ds_config, zero_stage
from .metrics import device_peak_tflops, memory_gb, step_rate
from .progress import Progress
from .schedule import schedule_from_config


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError("nsa-pretrain needs DeepSpeed: pip install deepspeed "
                          "(or pip install -e '.[train]')") from err
    return deepspeed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(deepspeed, device_type: str, timeout_minutes: Optional[float] = None) -> None:
    """Join the launcher's process group, or make a world of one without a launcher.
    ``timeout_minutes``: how long a collective may wait for a lost rank (DeepSpeed's default)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # No launcher: describe a world of one the way torchrun would (DeepSpeed reads these).
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("LOCAL_WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", str(_free_port()))):
            os.environ.setdefault(key, value)
    extra = {}
    if timeout_minutes:
        from datetime import timedelta
        extra["timeout"] = timedelta(minutes=timeout_minutes)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, **extra)


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class History:
    """What rank 0 reports at the end (also written to ``summary.json``)."""

    losses: list = field(default_factory=list)  # (step, loss)
    eval_losses: list = field(default_factory=list)  # (step, loss)
    tokens_per_s: list = field(default_factory=list)  # per rank, per log window
    tflops: list = field(default_factory=list)
    mfu: list = field(default_factory=list)


@torch.no_grad()
def _grad_norm(model: torch.nn.Module) -> float:
    """L2 norm of all gradients (each shared parameter once)."""
    grads = {id(p): p.grad for p in model.parameters() if p.grad is not None}
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads.values()])))


def _longest_document(selected: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Rows of ``selected`` [S, n] for the longest packed document (block ids count from
    each document's start, so one document makes a readable image)."""
    cu = cu_seqlens.tolist()
    i = max(range(len(cu) - 1), key=lambda j: cu[j + 1] - cu[j])
    return selected[cu[i]:cu[i + 1]]


class Trainer:
    """Builds everything from a TrainConfig and runs ``train()``; every rank makes one."""

    def __init__(self, cfg: TrainConfig, resume: Optional[str] = None, log_all_ranks: bool = False,
                 parallel_state=None):
        self.cfg = cfg
        self.deepspeed = _import_deepspeed()
        self.device = self._pick_device()
        init_distributed(self.deepspeed, self.device.type)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.progress = Progress(cfg.train_steps, self.rank, log_all_ranks)
        self._limit_cpu_threads()
        _seed_everything(cfg.seed)

        self.model_cfg = ModelConfig.from_yaml(cfg.model)
        if cfg.seq_len > self.model_cfg.max_seq_len:
            raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len="
                             f"{self.model_cfg.max_seq_len} ({cfg.model})")
        pc = cfg.parallel
        if parallel_state is None and (pc.tp > 1 or pc.sp > 1):
            pc.check_model(self.model_cfg, self.world_size, cfg.seq_len)
            parallel_state = pc.build_state(self.world_size, self.rank)
        self.parallel_state = parallel_state
        self.comm_stats = None
        if parallel_state is not None:  # TP/SP: only the DP coordinate chooses the data
            self.dp_rank, self.dp_world = parallel_state.dp_rank, parallel_state.dp
        else:
            self.dp_rank, self.dp_world = self.rank, self.world_size
        self._load_data()
        self.ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
        self._full_resume = None  # a layout-free (resharded) checkpoint to load
        resume_path = self._find_resume(resume)
        self.precision = cfg.resolved_precision(
            self.device.type, self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        ds_path = cfg.deepspeed
        self.ds_config = resolve_ds_config(load_ds_json(ds_path), cfg, self.dp_world, self.precision,
                                           path=ds_path)
        if zero_stage(self.ds_config) == 3 and parallel_state is not None and parallel_state.head_parallel > 1:
            # The parallel layers call their (partitioned) weights functionally, outside the
            # module hooks through which ZeRO-3 gathers them; TP already shards the weights.
            raise ValueError(f"ZeRO-3 ({ds_path}) with tp*sp = {parallel_state.head_parallel} is not "
                             "supported: use ZeRO 1-2 with tensor / sequence parallelism")
        model = self._build_model()
        self.engine = self._build_engine(model)
        self.schedule = schedule_from_config(cfg)
        self.ckpt = CheckpointManager(self.ckpt_root, self.rank, self.world_size, dist.barrier,
                                      keep=cfg.keep_checkpoints)
        self.step, self.consumed_samples, self.last_saved = 0, 0, -1
        self.history = History()
        self._load_resume(resume_path)
        self.tb = None
        if cfg.tensorboard and self.rank == 0:
            from .tensorboard import TBLogger
            self.tb = TBLogger(os.path.join(cfg.output_dir, "tensorboard"))

    # ------------------------------------------------------------------ building
    def _pick_device(self) -> torch.device:
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cpu")

    def _limit_cpu_threads(self) -> None:
        """Ranks sharing a CPU split its cores instead of oversubscribing them."""
        if self.device.type != "cpu":
            return
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))

    def _load_data(self) -> None:
        cfg = self.cfg
        if cfg.mock_data:
            from ..data import MockDataset

            self.tokenizer_path, self.tokenizer_sha = None, None
            V = self.model_cfg.vocab_size
            self.train_ds = MockDataset(V, cfg.seq_len, seed=cfg.seed, split="train")
            self.valid_ds = MockDataset(V, cfg.seq_len, seed=cfg.seed, split="valid")
            return
        from ..data import PackedDataset, Tokenizer

        tok = Tokenizer.load(cfg.tokenizer)
        if tok.vocab_size > self.model_cfg.vocab_size:
            raise ValueError(f"tokenizer {cfg.tokenizer} has {tok.vocab_size} tokens but the model "
                             f"({cfg.model}) only vocab_size={self.model_cfg.vocab_size}")
        self.tokenizer_path = str(tok.path)
        self.tokenizer_sha = tok.sha256
        self.train_ds = PackedDataset(cfg.data_prefix, cfg.seq_len, seed=cfg.seed, split="train")
        self.valid_ds = PackedDataset(cfg.data_prefix, cfg.seq_len, seed=cfg.seed, split="valid")

    def _build_model(self) -> torch.nn.Module:
        from ..models import NSADecoderLM

        # On a GPU the weights are made there: initialising a 1B model on the host is slow.
        with torch.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            model = NSADecoderLM(self.model_cfg, backend=self.cfg.attention_backend)
        model.gradient_checkpointing = self.cfg.activation_checkpointing
        model.loss_chunk = self.cfg.loss_chunk_tokens
        # FLOPs need the full weight shapes: count before ZeRO-3 partitions them.
        self.flops_per_token = model.flops_per_token(self.cfg.seq_len)
        self.num_parameters = model.num_parameters()
        ps = self.parallel_state
        self.param_layout = None
        if ps is not None and ps.head_parallel > 1:
            # Every rank built the same full model from the seed; each keeps its slice.
            from ..parallel import CommStats, parallelize
            self.comm_stats = CommStats()
            pc = self.cfg.parallel
            model = parallelize(model, ps, megatron_sp=pc.megatron_sp, comm_stats=self.comm_stats,
                                selection_comm=pc.selection_comm)
            # Which slice of which full parameter each TP rank holds, for nsa-convert consolidate.
            from ..convert.consolidate import local_layout
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, (ps.tp_rank, local_layout(model)))
            self.param_layout = [dict(gathered)[r] for r in range(ps.tp)]
        if self._full_resume:
            self._load_full_weights(model, self._full_resume)
        if zero_stage(self.ds_config) == 3:
            self._zero3_leaf_attention(model)
        return model

    # ------------------------------------------------------------------ layout-free resume
    def _load_full_weights(self, model: torch.nn.Module, path: str) -> None:
        from .full_resume import load_weights
        load_weights(model, path, self.model_cfg.tie_embeddings)

    def _load_full_optimizer(self, path: str) -> dict:
        """Adam state of a resharded checkpoint (the weights are already in); returns its metadata."""
        from .full_resume import load_optimizer

        meta = read_meta(path)
        adam_step = float(meta.get("adam_step") or meta["step"])
        if meta.get("optimizer") == "reset" or not load_optimizer(
                self.engine, path, adam_step, self.model_cfg.tie_embeddings):
            self.progress.print(f"[resume] {path}: weights only; the optimizer state was RESET by "
                                f"'nsa-convert reshard --reset-optimizer' (Adam starts afresh)")
            return meta
        self.engine.global_steps = int(meta["step"])
        ps = self.parallel_state
        self.progress.print(f"[resume] {path}: weights and Adam state cut for this layout "
                            f"(tp={ps.tp if ps else 1}, sp={ps.sp if ps else 1}, dp={self.dp_world}); "
                            f"RNG states start from the seed")
        return meta

    def _plain_grad_norm(self, model: torch.nn.Module) -> float:
        """Global gradient norm without ZeRO's help (ZeRO-0); TP shards counted once each."""
        ps = self.parallel_state
        if ps is not None and ps.head_parallel > 1:
            from ..parallel import grad_norm
            return float(grad_norm(model, ps))
        return _grad_norm(model)

    def _zero3_leaf_attention(self, model: torch.nn.Module) -> None:
        """ZeRO-3 gathers a module's weights at each call, and every rank must make the same
        calls. The phi compressor runs once per packed document, which differs between
        ranks; gathering each whole NSAAttention once per call (a ZeRO-3 "leaf") keeps the
        collectives in step."""
        from deepspeed.utils import set_z3_leaf_modules

        from ..modules import DenseAttention, NSAAttention

        if model.gradient_checkpointing and self.model_cfg.recompute == "keep_attention":
            raise ValueError("model recompute: keep_attention calls the attention layer's parts "
                             "outside its forward, where ZeRO-3 cannot gather its weights: use "
                             "recompute: full with ZeRO-3, or ZeRO stage 0-2")

        # (the attention layers read their projections' weights directly: one fused GEMM)
        set_z3_leaf_modules(model, [NSAAttention, DenseAttention], raise_if_not_found=False)

    def _build_engine(self, model: torch.nn.Module):
        cfg = self.cfg
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        extra = {"fused": True} if self.device.type == "cuda" else {}
        optimizer = torch.optim.AdamW(groups, lr=self.schedule_lr0(), betas=tuple(cfg.betas),
                                      eps=cfg.adam_eps, **extra)
        mpu = self.parallel_state.mpu() if self.parallel_state is not None else None
        engine, _, _, _ = self.deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=self.ds_config, mpu=mpu)
        return engine

    def schedule_lr0(self) -> float:
        return schedule_from_config(self.cfg)(0)

    # ------------------------------------------------------------------ resume
    def _find_resume(self, resume: Optional[str]) -> Optional[str]:
        """The checkpoint to resume from, checked against this run before anything heavy is
        built (a bad path or an incompatible checkpoint fails in seconds)."""
        path = find_resume_checkpoint(resume, self.ckpt_root, warn=self.progress.print)
        if path is None:
            if resume == "auto":
                self.progress.print(f"[resume] no checkpoint under {self.ckpt_root}: starting fresh")
            elif os.path.isfile(os.path.join(self.ckpt_root, "latest")):
                # A fresh run would mix its checkpoints with the old run's.
                raise ValueError(f"{self.cfg.output_dir} already holds checkpoints of another run; "
                                 f"pass --resume auto to continue it, or choose a new output_dir")
            return None
        meta = read_meta(path)
        ps = self.parallel_state
        for w in check_compatible(meta, self.model_cfg.to_dict(), self.tokenizer_sha,
                                  self.cfg.data_prefix, self.cfg.seq_len, self.world_size,
                                  layout=(ps.tp, ps.sp) if ps is not None else (1, 1)):
            self.progress.print(f"[resume] warning: {w}")
        consumed, per_round = int(meta["consumed_samples"]), self.cfg.micro_batch_size * self.dp_world
        if meta.get("layout") == "full":  # nsa-convert reshard output: any layout
            if consumed % per_round:
                raise ValueError(f"checkpoint {path}: consumed_samples={consumed} is not a multiple of "
                                 f"micro_batch_size x data-parallel size = {per_round}; choose sizes that "
                                 f"divide it to continue the same sample order")
            self._check_full_global_batch(path, meta)
            self._full_resume = path
        else:
            tc = meta.get("train_config") or {}
            for key in ("micro_batch_size", "grad_accum_steps"):
                if key in tc and tc[key] != getattr(self.cfg, key):
                    raise ValueError(f"checkpoint {path}: {key}={tc[key]}, this run {getattr(self.cfg, key)}; "
                                     f"keep micro_batch_size and grad_accum_steps when resuming (or "
                                     f"convert it with 'nsa-convert reshard')")
        return path

    def _load_resume(self, path: Optional[str]) -> None:
        if path is None:
            return
        if self._full_resume:
            meta = self._load_full_optimizer(path)
        else:
            meta = self.ckpt.load(self.engine, path)
        self.step = self.last_saved = int(meta["step"])
        self.consumed_samples = int(meta["consumed_samples"])
        self.progress.print(f"[resume] loaded {path} (step {self.step}, "
                            f"{self.consumed_samples} samples consumed)")

    def _meta(self) -> dict:
        import deepspeed

        return {"model_config": self.model_cfg.to_dict(), "train_config": self.cfg.to_dict(),
                "deepspeed_config": self.ds_config, "tokenizer_path": self.tokenizer_path,
                "tokenizer_sha256": self.tokenizer_sha, "data_prefix": self.cfg.data_prefix,
                "seq_len": self.cfg.seq_len, "consumed_samples": self.consumed_samples,
                "global_batch": self.cfg.global_batch(self.dp_world),
                "tokens_seen": self.consumed_samples * self.cfg.seq_len,
                "param_layout": self.param_layout,
                "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__}}

    def save(self) -> str:
        path = self.ckpt.save(self.engine, self.step, self._meta())
        self.last_saved = self.step
        self.progress.print(f"[checkpoint] step {self.step} -> {path}")
        return path

    # ------------------------------------------------------------------ loop
    def _mean_over_dp(self, values: list[float]) -> list[float]:
        # On the run's device: NCCL reduces only CUDA tensors.
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t)
            t /= self.world_size
        return t.tolist()

    def _to_device(self, batch: dict) -> dict:
        # cu_seqlens stays on the CPU: the attention reads its values on the host (validation,
        # launch geometry), and a CUDA copy would make every layer wait for the GPU.
        out = {k: (v if k == "cu_seqlens" else v.to(self.device, non_blocking=True)) for k, v in batch.items()}
        if batch["cu_seqlens"].numel() == 2 and batch["input_ids"].shape[0] == 1:
            out["cu_seqlens"] = None  # one document: nothing to keep apart
        return out

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over ``eval_batches`` micro-batches per rank of the valid split."""
        from ..data import build_dataloader

        cfg = self.cfg
        per_round = cfg.micro_batch_size * self.dp_world
        n = min(cfg.eval_batches or 1, max(1, len(self.valid_ds) // per_round))
        loader = iter(build_dataloader(self.valid_ds, cfg.micro_batch_size, self.dp_rank, self.dp_world))
        self.engine.eval()
        total, count = 0.0, 0.0
        for _ in range(n):
            b = self._to_device(next(loader))
            out = self.engine(b["input_ids"], labels=b["labels"], cu_seqlens=b["cu_seqlens"])
            tokens = float((b["labels"] != -100).sum())
            total += float(out.loss) * tokens
            count += tokens
        self.engine.train()
        t = torch.tensor([total, count], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t)
        return float(t[0] / max(t[1], 1.0))

    def _should_stop_for_time(self, start: float) -> bool:
        if self.cfg.max_minutes <= 0:
            return False
        flag = torch.tensor([float(time.perf_counter() - start > 60 * self.cfg.max_minutes)],
                            device=self.device)
        if self.world_size > 1:
            dist.broadcast(flag, src=0)  # rank 0's clock decides, so all ranks stop together
        return bool(flag.item())

    def _set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def train(self) -> dict:
        """Run until ``train_steps`` (or ``max_minutes``); evaluates and saves at the end.
        Returns the summary (rank 0's numbers; the same dict on every rank)."""
        from ..data import build_dataloader

        cfg, engine = self.cfg, self.engine
        loader = iter(build_dataloader(self.train_ds, cfg.micro_batch_size, self.dp_rank,
                                       self.dp_world, consumed_samples=self.consumed_samples))
        peak = device_peak_tflops(self.device, self.precision, cfg.peak_tflops)
        # Tokens per GPU: the ranks of one TP x Ulysses group share the same samples.
        head_parallel = self.parallel_state.head_parallel if self.parallel_state is not None else 1
        tokens_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * cfg.seq_len / head_parallel
        self.progress.print(
            f"[train] {self.num_parameters / 1e6:.2f}M parameters, {self.world_size} rank(s) on "
            f"{self.device.type}, ZeRO-{zero_stage(self.ds_config)}, {self.precision}, global batch "
            f"{cfg.global_batch(self.dp_world)} x {cfg.seq_len} tokens, steps {self.step}->{cfg.train_steps}")
        start = time.perf_counter()
        self.progress.start(self.step)
        window_start, window_steps, steady_tokens, steady_time = time.perf_counter(), 0, 0, 0.0
        first_step = self.step
        engine.train()
        while self.step < cfg.train_steps:
            step_start = time.perf_counter()
            lr = self.schedule(self.step)
            self._set_lr(lr)
            log_now = (self.step + 1) % cfg.log_every == 0 or self.step == first_step
            image_now = bool(cfg.image_every) and ((self.step + 1) % cfg.image_every == 0
                                                   or self.step == first_step)
            stats, stats_cu, fallback_norm = None, None, None
            losses = []
            for micro in range(cfg.grad_accum_steps):
                b = self._to_device(next(loader))
                out = engine(b["input_ids"], labels=b["labels"], cu_seqlens=b["cu_seqlens"],
                             return_stats=(log_now or image_now) and micro == 0)
                engine.backward(out.loss)
                if micro == cfg.grad_accum_steps - 1 and zero_stage(self.ds_config) == 0:
                    # ZeRO-0 reports no norm; its gradients are plain, averaged, unclipped here.
                    fallback_norm = self._plain_grad_norm(engine.module)
                engine.step()
                losses.append(out.loss.detach())
                if out.stats:
                    stats, stats_cu = out.stats, b["cu_seqlens"]
            self.step += 1
            self.consumed_samples += cfg.global_batch(self.dp_world)
            loss = self._mean_over_dp([float(torch.stack(losses).float().mean())])[0]
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {self.step}; lower lr or check data")
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else fallback_norm
            self.history.losses.append((self.step, loss))
            window_steps += 1
            if self.step > first_step + 1:  # the first step includes warm-up costs
                steady_tokens += tokens_per_step
                steady_time += time.perf_counter() - step_start
            if self.tb:
                self.tb.scalars({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm},
                                self.step)
            if self.tb and stats and image_now and cfg.image_layer < len(stats):
                sel = stats[cfg.image_layer].selected_blocks
                self.tb.blocks_image(sel if stats_cu is None else _longest_document(sel, stats_cu),
                                     self.model_cfg.nsa.sel_block, cfg.image_layer, self.step)
            if log_now or self.step == cfg.train_steps:
                rate = step_rate(tokens_per_step * window_steps, time.perf_counter() - window_start,
                                 self.flops_per_token, peak)
                self.history.tokens_per_s.append(rate.tokens_per_s)
                self.history.tflops.append(rate.tflops)
                self.history.mfu.append(rate.mfu)
                if self.tb:
                    self.tb.scalars({"perf/tokens_per_s_per_gpu": rate.tokens_per_s,
                                     "perf/tflops_per_gpu": rate.tflops, "perf/mfu": rate.mfu},
                                    self.step)
                    self.tb.scalars({f"mem/{k}": v for k, v in memory_gb(self.device).items()}, self.step)
                    if stats and log_now:
                        self.tb.attention_stats(stats, self.step)
                    if self.comm_stats is not None:  # bytes per layer and collective since the last log
                        self.tb.scalars(self.comm_stats.scalars(), self.step)
                    self.tb.flush()
                mfu = f" MFU {rate.mfu:.2%}" if rate.mfu is not None else ""
                self.progress.update(self.step, loss, rate.tokens_per_s, f" lr {lr:.2e}{mfu}")
                window_start, window_steps = time.perf_counter(), 0
                if self.comm_stats is not None:
                    self.comm_stats.reset()
            if (cfg.eval_batches and cfg.eval_every and self.step % cfg.eval_every == 0
                    and self.step < cfg.train_steps):
                self._log_eval()
            if (cfg.save_checkpoints and cfg.save_every and self.step % cfg.save_every == 0
                    and self.step < cfg.train_steps):
                self.save()
            if self._should_stop_for_time(start):
                self.progress.print(f"[train] max_minutes={cfg.max_minutes} reached at step {self.step}")
                break
        train_time = time.perf_counter() - start
        self.progress.close()
        eval_loss = self._log_eval() if cfg.eval_batches else None
        if not cfg.save_checkpoints:
            ckpt = None
        elif self.last_saved != self.step:
            ckpt = self.save()
        else:
            ckpt = os.path.join(self.ckpt_root, f"step_{self.step:08d}")
        return self._summary(train_time, steady_tokens, steady_time, eval_loss, ckpt, peak,
                             steady_steps=max(0, self.step - first_step - 1))

    def _log_eval(self) -> float:
        loss = self.evaluate()
        self.history.eval_losses.append((self.step, loss))
        if self.tb:
            self.tb.scalars({"eval/loss": loss}, self.step)
            self.tb.flush()
        self.progress.print(f"[eval] step {self.step} valid loss {loss:.4f} "
                            f"(ppl {math.exp(min(loss, 50)):.1f})")
        return loss

    def _summary(self, train_time, steady_tokens, steady_time, eval_loss, ckpt, peak,
                 steady_steps: int = 0) -> dict:
        h = self.history
        tps = steady_tokens / steady_time if steady_time > 0 else (h.tokens_per_s[-1] if h.tokens_per_s else 0.0)
        ps = self.parallel_state
        summary = {
            "steps": self.step, "ranks": self.world_size, "device": self.device.type,
            "zero_stage": zero_stage(self.ds_config), "precision": self.precision,
            "loss_first": h.losses[0][1] if h.losses else None,
            "loss_last": h.losses[-1][1] if h.losses else None,
            "loss_curve": h.losses,
            "eval_loss": eval_loss, "eval_curve": h.eval_losses,
            "tokens_per_s_per_rank": tps, "tokens_per_s_total": tps * self.world_size,
            "tflops_per_rank": tps * self.flops_per_token / 1e12,
            "mfu": (tps * self.flops_per_token / 1e12 / peak) if peak else None,
            "train_seconds": train_time, "tokens_seen": self.consumed_samples * self.cfg.seq_len,
            # Steady state: every step after the first (which pays compilation and warm-up).
            "seconds_per_step": steady_time / steady_steps if steady_steps else None,
            "flops_per_token": self.flops_per_token, "num_parameters": self.num_parameters,
            "attention": self.model_cfg.attention, "seq_len": self.cfg.seq_len,
            "micro_batch_size": self.cfg.micro_batch_size,
            "layout": {"tp": ps.tp if ps else 1, "sp": ps.sp if ps else 1,
                       "dp": self.dp_world},
            "peak_memory_gb": max(memory_gb(self.device).values()),  # CUDA peak, or peak RSS on CPU
            "checkpoint": os.path.abspath(ckpt) if ckpt else None,
            "tensorboard": os.path.abspath(os.path.join(self.cfg.output_dir, "tensorboard")),
        }
        if self.rank == 0:
            os.makedirs(self.cfg.output_dir, exist_ok=True)  # no checkpoint or TB may have made it
            path = os.path.join(self.cfg.output_dir, "summary.json")
            tmp = path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(summary, fh, indent=2)
            os.replace(tmp, path)
        return summary

    def close(self) -> None:
        if self.tb:
            self.tb.close()

    def _check_full_global_batch(self, path: str, meta: dict) -> None:
        """A resharded checkpoint continues its step, data position and LR schedule; another
        global batch (new DP size) would change what a step means, so it must be asked for
        when resharding (``nsa-convert reshard --allow-batch-change``)."""
        then, now = meta.get("global_batch"), self.cfg.global_batch(self.dp_world)
        if not then or then == now:
            return
        sizes = (f"micro_batch_size {self.cfg.micro_batch_size} x grad_accum_steps "
                 f"{self.cfg.grad_accum_steps} x data-parallel size {self.dp_world}")
        if not meta.get("allow_batch_change"):
            raise ValueError(f"checkpoint {path} was trained with a global batch of {then} samples, this run "
                             f"has {now} ({sizes}); choose sizes that keep {then}, or reshard with "
                             f"'nsa-convert reshard --allow-batch-change' to continue with {now}")
        self.progress.print(f"[resume] global batch {then} -> {now} samples ({sizes}), allowed by reshard "
                            f"--allow-batch-change: step, data position and LR schedule continue")

"""What a training process is made of, built in order and handed on as explicit bundles.

    start(cfg)                          -> Env    device, process groups, ranks, model config, printer
    load_data(env)                      -> Data   train / valid datasets, tokenizer identity
    build(env, record, full_weights)    -> Built  DeepSpeed config, model (parallelised), optimizer, engine

Data parallelism comes from the launcher (``RANK``, ``WORLD_SIZE``, ... set by torchrun or
the deepspeed launcher); a single process without a launcher runs as a world of one.
Tensor / sequence / context-parallel layouts plug in through a ``nsa_dist.parallel.ParallelState``: it
decides the data-parallel rank that picks the batches, parallelises the model before
``deepspeed.initialize`` and is handed to DeepSpeed as ``mpu``.
"""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint.full import load_weights
from ..checkpoint.layout import local_layout, ordered_parameters
from ..config import ModelConfig
from .config import TrainConfig
from .ds_config import load_ds_json, resolve_ds_config, zero_stage
from .progress import Progress
from .schedule import schedule_from_config


def import_deepspeed():
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


def init_distributed(deepspeed, device_type: str, timeout_s: Optional[float] = None) -> None:
    """Join the launcher's process group, or make a world of one without a launcher.

    ``timeout_s``: how long any collective may wait for a lost rank, for the world and for
    every group made later (DeepSpeed's, the parallel layouts'); None keeps torch's defaults.
    Under torchrun the process group's keys live in the rendezvous store, which outlives a
    restart: each attempt keeps its keys under its own prefix (``_elastic_store``)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # No launcher: describe a world of one the way torchrun would (DeepSpeed reads these).
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("LOCAL_WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", str(_free_port()))):
            os.environ.setdefault(key, value)
    timeout = None
    if timeout_s:
        from datetime import timedelta

        from torch.distributed import distributed_c10d
        timeout = timedelta(seconds=timeout_s)
        # new_group() without a timeout takes these module defaults, not the world's.
        distributed_c10d.default_pg_timeout = timeout
        distributed_c10d.default_pg_nccl_timeout = timeout
    store = _elastic_store(timeout)
    if store is not None:
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               **({"timeout": timeout} if timeout else {}))
    if device_type == "cpu":
        dist.barrier()  # every rank is past DeepSpeed's init, where each maps the others' buffers
        release_shm_buffer(dist.get_rank())


def _elastic_store(timeout):
    """The store of a worker started by torchrun (``TORCHELASTIC_USE_AGENT_STORE``), its keys
    under ``attempt_<restart count>/``; None otherwise (the launcher's env:// rendezvous).

    torchrun's workers share the rendezvous TCPStore, which lives as long as the agent: a
    restarted worker group would read the keys the killed attempt left (the dead ranks'
    gloo addresses, barrier counters) and connect to ranks that are gone, hanging in
    ``new_group`` or the first collective until the timeout. A per-attempt prefix keeps
    each attempt's keys apart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False,
                          timeout=timeout or timedelta(minutes=30))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"nsa_dist/attempt_{attempt}", store)


SHM_BUFFER = "deepspeed_allreduce_buffer"


def shm_buffer_path(rank: int, addr: Optional[str] = None, port: Optional[str] = None) -> str:
    """The shared-memory file DeepSpeed's CPU backend makes for ``rank`` (when all ranks share a
    host: the deepspeed launcher's LOCAL_SIZE equals the world): named by the user id and the
    rendezvous (MASTER_ADDR, MASTER_PORT of the environment unless given)."""
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    return os.path.join("/dev/shm", f"{SHM_BUFFER}_{os.getuid()}_{addr}_{port}_{rank}")


def release_shm_buffer(rank: int) -> None:
    """Remove ``rank``'s DeepSpeed allreduce buffer name (66 MB, which DeepSpeed never removes).
    Once every rank has mapped it (inside init) the mappings outlive the name, so removing it
    right after init leaves nothing behind, whatever way the run ends."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shm_buffer_path(rank))


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _pick_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _limit_cpu_threads(device: torch.device) -> None:
    """Ranks sharing a CPU split its cores instead of oversubscribing them."""
    if device.type != "cpu":
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


# ----------------------------------------------------------------------------- Env

@dataclass(frozen=True)
class Env:
    """Where and how this process trains: configs, device, ranks, layout, the printer."""
    cfg: TrainConfig
    model_cfg: ModelConfig
    device: torch.device
    rank: int
    world_size: int
    parallel_state: Any  # nsa_dist.parallel.ParallelState, or None: data parallel only
    progress: Progress

    @property
    def dp_rank(self) -> int:  # TP/SP: only the DP coordinate chooses the data
        return self.parallel_state.dp_rank if self.parallel_state is not None else self.rank

    @property
    def dp_world(self) -> int:
        return self.parallel_state.dp if self.parallel_state is not None else self.world_size

    @property
    def head_parallel(self) -> int:
        return self.parallel_state.head_parallel if self.parallel_state is not None else 1

    @property
    def replica_size(self) -> int:
        """Ranks sharing one replica's work: tp * sp * cp (1 without a layout)."""
        return self.parallel_state.replica_size if self.parallel_state is not None else 1

    @property
    def layout(self) -> tuple[int, int, int]:
        """(tp, sp, cp) of this run."""
        ps = self.parallel_state
        return (ps.tp, ps.sp, ps.cp) if ps is not None else (1, 1, 1)

    @property
    def tp_rank(self) -> int:
        return self.parallel_state.tp_rank if self.parallel_state is not None else 0


def start(cfg: TrainConfig, parallel_state=None, log_all_ranks: bool = False) -> Env:
    """Device, process groups and seeds of this process; the model config checked against the
    run. ``parallel_state``: a prebuilt layout (the bench reuses its groups), else made from
    ``cfg.parallel`` when it asks for tp, sp or cp > 1."""
    deepspeed = import_deepspeed()
    device = _pick_device()
    init_distributed(deepspeed, device.type, cfg.collective_timeout_s)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    progress = Progress(cfg.train_steps, rank, log_all_ranks)
    _limit_cpu_threads(device)
    _seed_everything(cfg.seed)
    model_cfg = cfg.model_config()
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len="
                         f"{model_cfg.max_seq_len} ({cfg.model})")
    pc = cfg.parallel
    if parallel_state is None and pc.replica_size > 1:
        pc.check_model(model_cfg, world_size, cfg.seq_len)
        if pc.cp > 1:  # before any group is built
            check_cp_zero_stage(pc.cp, cfg.deepspeed)
        parallel_state = pc.build_state(world_size, rank)
    return Env(cfg, model_cfg, device, rank, world_size, parallel_state, progress)


# ----------------------------------------------------------------------------- Data

@dataclass(frozen=True)
class Data:
    train: Any  # a PackedDataset or MockDataset
    valid: Any
    tokenizer_path: Optional[str]  # None with mock data
    tokenizer_sha: Optional[str]


def load_data(env: Env) -> Data:
    cfg, model_cfg = env.cfg, env.model_cfg
    if cfg.mock_data:
        from ..data import MockDataset

        V = model_cfg.vocab_size
        return Data(MockDataset(V, cfg.seq_len, seed=cfg.seed, split="train"),
                    MockDataset(V, cfg.seq_len, seed=cfg.seed, split="valid"), None, None)
    from ..data import PackedDataset, Tokenizer
    from ..data.shards import check_shards_tokenizer

    tok = Tokenizer.load(cfg.tokenizer)
    check_shards_tokenizer(cfg.data_prefix, tok)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer {cfg.tokenizer} has {tok.vocab_size} tokens but the model "
                         f"({cfg.model}) only vocab_size={model_cfg.vocab_size}")
    return Data(PackedDataset(cfg.data_prefix, cfg.seq_len, seed=cfg.seed, split="train"),
                PackedDataset(cfg.data_prefix, cfg.seq_len, seed=cfg.seed, split="valid"),
                str(tok.path), tok.sha256)


# ----------------------------------------------------------------------------- model, engine

@dataclass(frozen=True)
class Built:
    """The model under its DeepSpeed engine and the figures fixed when it was made."""
    engine: Any
    precision: str  # "bf16" | "fp32"
    ds_config: dict
    flops_per_token: float  # training FLOPs per token of the whole model
    num_parameters: int  # of the whole (single-device) model
    param_layout: Optional[list]  # per TP rank: the layout record (tp*sp*cp > 1), else None
    comm_stats: Any  # nsa_dist.parallel.CommStats under tp*sp*cp > 1, else None

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.ds_config)


def build(env: Env, record: Optional[dict] = None, full_weights: Optional[str] = None) -> Built:
    """The model, its optimizer and DeepSpeed engine.

    record: the layout record of this rank in the checkpoint to resume (the optimizer gets its
    parameters in that order, see ``nsa_dist.checkpoint.layout``); full_weights: a
    layout-free checkpoint whose weights go in before DeepSpeed wraps the model.
    """
    cfg, ps = env.cfg, env.parallel_state
    precision = cfg.resolved_precision(env.device.type,
                                       env.device.type == "cuda" and torch.cuda.is_bf16_supported())
    ds_config = resolve_ds_config(load_ds_json(cfg.deepspeed), cfg, env.dp_world, precision, path=cfg.deepspeed)
    if zero_stage(ds_config) == 3 and env.replica_size > 1:
        # The parallel layers call their (partitioned) weights functionally, outside the
        # module hooks through which ZeRO-3 gathers them; TP already shards the weights.
        raise ValueError(f"ZeRO-3 ({cfg.deepspeed}) with tp*sp*cp = {env.replica_size} is not "
                         "supported: use ZeRO 1-2 with tensor / sequence / context parallelism")
    model, comm_stats, flops_per_token, num_parameters = _build_model(env, ds_config, full_weights)
    groups = _param_groups(cfg, ordered_parameters(model, record))
    param_layout = None
    if ps is not None and ps.replica_size > 1:
        # Which slice of which full parameter each TP rank holds, in the optimizer's order.
        gathered = [None] * env.world_size
        mine = local_layout(model, [p for g in groups for p in g["params"]])
        dist.all_gather_object(gathered, (ps.tp_rank, mine))
        param_layout = [dict(gathered)[r] for r in range(ps.tp)]
    extra = {"fused": True} if env.device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(groups, lr=schedule_from_config(cfg)(0), betas=tuple(cfg.betas),
                                  eps=cfg.adam_eps, **extra)
    engine, _, _, _ = import_deepspeed().initialize(model=model, optimizer=optimizer, config=ds_config,
                                                    mpu=ps.mpu() if ps is not None else None)
    if env.device.type == "cuda":
        model.recompute_budget = _recompute_budget(engine, model, env)
    return Built(engine, precision, ds_config, flops_per_token, num_parameters, param_layout, comm_stats)


def _recompute_budget(engine, model: torch.nn.Module, env: Env) -> int:
    """Bytes recompute "auto" may keep (``AUTO_KEEP_FRACTION`` of what is free once the
    optimizer's lazily made state and the gradient buffers exist), the smallest over the
    ranks: every rank must recompute the same layers, since a recomputed layer repeats its
    collectives."""
    from ..models.decoder import AUTO_KEEP_FRACTION, free_gpu_memory

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # DeepSpeed's wrapper, or torch's
    # Adam's two fp32 moments per (partitioned) master weight, made at the first step
    pending = sum(2 * p.numel() * 4 for g in inner.param_groups for p in g["params"] if not inner.state.get(p))
    pending += sum(p.numel() * p.element_size() for p in model.parameters())  # the gradients
    budget = torch.tensor([max(0.0, AUTO_KEEP_FRACTION * (free_gpu_memory(env.device) - pending))],
                          dtype=torch.float64, device=env.device)
    if env.world_size > 1:
        dist.all_reduce(budget, op=dist.ReduceOp.MIN)
    return int(budget.item())


def check_cp_zero_stage(cp: int, deepspeed_json: str) -> None:
    """Context parallel runs under ZeRO 0-2 (ZeRO-3 is refused for every parallel layout:
    the parallel layers call their weights outside ZeRO-3's gathering hooks)."""
    if zero_stage(load_ds_json(deepspeed_json)) == 3:
        raise ValueError(f"context parallel (cp={cp}) with ZeRO-3 ({deepspeed_json}) is not supported: "
                         "use a DeepSpeed config with zero_optimization.stage 0, 1 or 2 "
                         "(e.g. configs/deepspeed/zero1.json), or cp=1")


def _param_groups(cfg: TrainConfig, named: list) -> list[dict]:
    """AdamW groups: weight decay on matrices but the embedding; each a stable subset of
    ``named`` [(name, parameter)], whose order is the optimizer's."""
    decay, no_decay = [], []
    for name, p in named:
        if p.requires_grad:
            (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _build_model(env: Env, ds_config: dict, full_weights: Optional[str]):
    """(model, comm stats or None, FLOPs per token, parameter count) for this rank."""
    from ..models import NSADecoderLM

    cfg = env.cfg
    # On a GPU the weights are made there: initialising a 1B model on the host is slow.
    with torch.device(env.device) if env.device.type == "cuda" else contextlib.nullcontext():
        model = NSADecoderLM(env.model_cfg, backend=cfg.attention_backend)
    model.gradient_checkpointing = cfg.activation_checkpointing
    model.loss_chunk = cfg.loss_chunk_tokens
    # FLOPs need the full weight shapes: count before ZeRO-3 partitions them.
    flops_per_token = model.flops_per_token(cfg.seq_len)
    num_parameters = model.num_parameters()
    ps, comm_stats = env.parallel_state, None
    if ps is not None and ps.replica_size > 1:
        # Every rank built the same full model from the seed; each keeps its slice.
        from ..parallel import CommStats, parallelize
        comm_stats = CommStats()
        pc = cfg.parallel
        model = parallelize(model, ps, megatron_sp=pc.megatron_sp, comm_stats=comm_stats,
                            selection_comm=pc.selection_comm)
    if full_weights:
        load_weights(model, full_weights, env.model_cfg.tie_embeddings)
    if zero_stage(ds_config) == 3:
        _zero3_leaf_attention(model, env.model_cfg.recompute)
    return model, comm_stats, flops_per_token, num_parameters


def _zero3_leaf_attention(model: torch.nn.Module, recompute: str) -> None:
    """ZeRO-3 gathers a module's weights at each call, and every rank must make the same
    calls. The phi compressor runs once per packed document, which differs between
    ranks; gathering each whole NSAAttention once per call (a ZeRO-3 "leaf") keeps the
    collectives in step."""
    from deepspeed.utils import set_z3_leaf_modules

    from ..modules import DenseAttention, NSAAttention

    if model.gradient_checkpointing and recompute == "keep_attention":
        raise ValueError("model recompute: keep_attention calls the attention layer's parts "
                         "outside its forward, where ZeRO-3 cannot gather its weights: use "
                         "recompute: full with ZeRO-3, or ZeRO stage 0-2")
    model.allow_keep_attention = False  # recompute "auto" then means full
    # (the attention layers read their projections' weights directly: one fused GEMM)
    set_z3_leaf_modules(model, [NSAAttention, DenseAttention], raise_if_not_found=False)

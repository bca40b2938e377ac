"""TrainConfig: everything one pretraining run needs besides the model and DeepSpeed JSON.

Loaded from YAML with strict keys (a typo is a ValueError naming the key and its closest
valid spelling) and validated at construction. Relative paths in a YAML file are taken
relative to the working directory the trainer is started from (the repository root for
the shipped configs), so the same file works from the launchers and from tests.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from ..config import ConfigBase, ModelConfig, _numbers, _positive_int, _require
from ..parallel.state import ParallelConfig

PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULE_ON_RESUME = ("keep", "replan")


@dataclass
class TrainConfig(ConfigBase):
    """Global batch = micro_batch_size * grad_accum_steps * data-parallel ranks (samples of
    ``seq_len`` tokens). Steps count optimizer steps."""

    # What to train on.
    model: str = "configs/model/tiny.yaml"  # ModelConfig YAML
    # fields of that YAML changed for this run, nested as in it: {num_layers: 8, nsa: {shared_kv:
    # true}}; on the command line model.num_layers=8 model.nsa.shared_kv=true (``model_config``)
    model_overrides: dict = field(default_factory=dict)
    deepspeed: str = "configs/deepspeed/zero2.json"  # DeepSpeed JSON ("auto" fields filled from here)
    data_prefix: str = "data_cache/stdlib"  # PackedDataset prefix (tools/preprocess_data.py output)
    mock_data: bool = False  # random tokens, one document per sample (throughput runs; no data or tokenizer read)
    tokenizer: str = "data_cache/tokenizer"  # dir or .model; recorded (path + hash) in every checkpoint
    output_dir: str = "runs/tiny"  # checkpoints/ and tensorboard/ go below it

    # Batch and length.
    seq_len: int = 256
    micro_batch_size: int = 2
    grad_accum_steps: int = 1
    train_steps: int = 100
    max_minutes: float = 0.0  # > 0: stop (and save) after this many minutes of training

    # Optimizer (torch AdamW as DeepSpeed client optimizer) and schedule.
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    decay_steps: int = 0  # cosine decay length after warm-up; 0 means train_steps - warmup_steps
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    # On resume, when this config's schedule differs from the checkpoint's (e.g. a larger
    # train_steps): "keep" continues the checkpoint's cosine and holds min_lr past its end;
    # "replan" recomputes it from this config (the lr may jump at the resume step).
    schedule_on_resume: str = "keep"

    # Numerics and memory.
    precision: str = "auto"  # auto: bf16 on a CUDA device with bf16 support, fp32 otherwise
    activation_checkpointing: bool = False
    # the loss this many positions at a time, so full-vocabulary logits never exist for a long
    # sequence (64k x 32k vocab is 8 GB of fp32 logits and as much for their gradient); 0: off
    loss_chunk_tokens: int = 16384
    attention_backend: str = "auto"  # "auto", "reference" or "triton" (see nsa_dist.ops)
    seed: int = 1234

    # Evaluation, checkpoints, logging.
    eval_every: int = 50  # steps; 0 evaluates only at the end
    eval_batches: int = 8  # micro-batches per rank per evaluation; 0 turns evaluation off
    save_every: int = 50  # steps; 0 saves only at the end
    save_checkpoints: bool = True  # false: never write a checkpoint (benchmarks)
    keep_checkpoints: int = 3  # newest complete checkpoints kept; 0 keeps all
    log_every: int = 5  # steps between scalar logs and progress lines
    image_every: int = 50  # steps between selected-block images; 0 turns them off
    image_layer: int = 0  # layer whose selected blocks are drawn (KV head 0)
    tensorboard: bool = True
    peak_tflops: float = 0.0  # device peak for MFU where the table has none (CPU); 0: MFU n/a

    # Failures. A collective that waits longer than this for another rank fails, and the run
    # exits naming the rank that stopped answering (status 76). It must exceed the longest
    # gap between two collectives: the first step (kernel compilation), a save, an evaluation.
    collective_timeout_s: float = 600.0

    # Layout: tensor / Ulysses sequence parallel sizes; data parallel is the rest of the world.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        _numbers(self, "lr", "min_lr", "weight_decay", "adam_eps", "grad_clip", "max_minutes", "peak_tflops",
                 "collective_timeout_s")
        _positive_int(self, "seq_len", "micro_batch_size", "grad_accum_steps", "train_steps",
                      "log_every")
        for name in ("warmup_steps", "decay_steps", "eval_every", "eval_batches", "save_every",
                     "loss_chunk_tokens",
                     "keep_checkpoints", "image_every", "image_layer", "seed"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name,
                     "must be an integer >= 0", value)
        for name in ("model", "deepspeed", "data_prefix", "tokenizer", "output_dir"):
            _require(isinstance(getattr(self, name), str) and getattr(self, name), name,
                     "must be a non-empty path string", getattr(self, name))
        _require(isinstance(self.model_overrides, dict), "model_overrides",
                 "must be a mapping of model YAML fields (e.g. {nsa: {shared_kv: true}})", self.model_overrides)
        if self.model_overrides and os.path.isfile(self.model):
            self.model_config()  # a misspelt or ill-typed model field fails here, naming it
        _require(self.lr > 0, "lr", "must be > 0", self.lr)
        _require(isinstance(self.min_lr, (int, float)) and 0 <= self.min_lr <= self.lr, "min_lr",
                 f"must be in [0, lr={self.lr}]", self.min_lr)
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        _require(isinstance(self.betas, (list, tuple)) and len(self.betas) == 2
                 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)",
                 self.betas)
        _require(self.adam_eps > 0, "adam_eps", "must be > 0", self.adam_eps)
        _require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 turns clipping off)", self.grad_clip)
        _require(self.max_minutes >= 0, "max_minutes", "must be >= 0", self.max_minutes)
        _require(self.peak_tflops >= 0, "peak_tflops", "must be >= 0", self.peak_tflops)
        _require(self.schedule_on_resume in SCHEDULE_ON_RESUME, "schedule_on_resume",
                 f"must be one of {SCHEDULE_ON_RESUME}", self.schedule_on_resume)
        _require(self.collective_timeout_s >= 5, "collective_timeout_s",
                 "must be >= 5 seconds (and longer than a step, a save or an evaluation)",
                 self.collective_timeout_s)
        _require(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}", self.precision)
        _require(self.attention_backend in ("auto", "reference", "triton"), "attention_backend",
                 "must be 'auto', 'reference' or 'triton'", self.attention_backend)
        for name in ("activation_checkpointing", "tensorboard", "mock_data", "save_checkpoints"):
            _require(isinstance(getattr(self, name), bool), name, "must be true or false",
                     getattr(self, name))
        self.betas = [float(b) for b in self.betas]

    def global_batch(self, dp_world_size: int) -> int:
        """Samples per optimizer step over all data-parallel ranks."""
        return self.micro_batch_size * self.grad_accum_steps * dp_world_size

    def resolved_precision(self, device_type: str, bf16_supported: bool) -> str:
        """'auto' becomes bf16 on CUDA with bf16 support and fp32 elsewhere (CPU)."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if device_type == "cuda" and bf16_supported else "fp32"

    def model_config(self) -> ModelConfig:
        """The run's ``ModelConfig``: the ``model`` YAML with ``model_overrides`` merged in
        (nested keys one by one), validated; an unknown key names the override."""
        base = ModelConfig.from_yaml(self.model)
        if not self.model_overrides:
            return base
        data = _merged(base.to_dict(), self.model_overrides)
        return ModelConfig.from_dict(data, where=f"{os.path.basename(self.model)} with model_overrides")

    def apply_overrides(self, overrides: Optional[list[str]]) -> "TrainConfig":
        """A new config with ``key=value`` overrides (values parsed as YAML scalars); keys under
        ``model.`` change fields of the model YAML (``model_overrides``), ``model=`` its path."""
        import yaml

        data = self.to_dict()
        for item in overrides or []:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like key=value (e.g. train_steps=20)")
            key, value = item.split("=", 1)
            *parents, leaf = key.strip().split(".")  # parallel.tp=2 sets a nested field
            if parents and parents[0] == "model":  # model.nsa.shared_kv=true: a model YAML field
                parents[0] = "model_overrides"
            node = data
            for i, name in enumerate(parents):
                if i and parents[0] == "model_overrides" and name not in node:
                    node[name] = {}  # model_overrides holds only the fields changed
                if not isinstance(node.get(name), dict):
                    raise ValueError(f"override {item!r}: {name!r} is not a section of the train config")
                node = node[name]
            try:
                node[leaf] = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ValueError(f"override {item!r}: {value!r} is not a valid YAML value") from None
        return TrainConfig.from_dict(data, where="override")


def _merged(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` merged in: nested mappings key by key, other values replaced."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out

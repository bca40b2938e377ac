"""Configuration dataclasses, loaded from / saved to YAML and validated at construction.

Every invalid value raises ``ValueError`` naming the field and the rule it breaks; unknown
keys in a YAML file raise ``ValueError`` naming the key (and the closest valid one).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from .fileio import atomic_open


class ConfigBase:
    """Dict/YAML round-tripping for nested dataclasses with strict key checking."""

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "") -> "ConfigBase":
        if not isinstance(data, dict):
            raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in data.items():
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {sorted(fields)}"
                raise ValueError(f"{where or cls.__name__}: unknown key '{key}'{hint}")
            sub = _dataclass_type(hints[key])
            if sub is not None and isinstance(value, dict):
                value = sub.from_dict(value, where=f"{where or cls.__name__}.{key}")
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "ConfigBase":
        import yaml

        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path) as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as err:
                raise ValueError(yaml_error_line(path, err)) from None
        return cls.from_dict(data, where=f"{os.path.basename(str(path))}")

    def to_yaml(self, path: str | os.PathLike) -> None:
        """Write atomically (``fileio.atomic_open``); the folder is made if missing."""
        import yaml

        with atomic_open(path) as fh:
            yaml.safe_dump(self.to_dict(), fh, sort_keys=False)


def yaml_error_line(path: str | os.PathLike, err: Exception) -> str:
    """One line for a YAML syntax error: ``file:line:column: what is wrong`` (1-based)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = " ".join(str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x)
    return f"{where}: invalid YAML: {what or type(err).__name__}; fix the file's syntax"


def _dataclass_type(tp: Any) -> Optional[type]:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def _require(cond: bool, name: str, rule: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"{name}={value!r}: {rule}")


def _numbers(obj: Any, *names: str) -> None:
    """Float fields: YAML 1.1 reads "1e-3" / "5e5" (no dot) as a string, taken here as the number."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, str):
            try:
                setattr(obj, name, float(value))
            except ValueError:
                raise ValueError(f"{name}={value!r}: must be a number") from None
        _require(isinstance(getattr(obj, name), (int, float)) and not isinstance(getattr(obj, name), bool),
                 name, "must be a number", value)


def _positive_int(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 name, "must be a positive integer", value)


@dataclass
class NSAConfig(ConfigBase):
    """The NSA function's hyper-parameters (SPEC.md; defaults are the paper's).

    cmp_block (l), cmp_stride (d), sel_block (l'), num_selected (n, forced blocks included),
    window (w; 0 turns the window branch off). Rules: d | l, d | l', l <= l', n >= 3.
    """

    cmp_block: int = 32
    cmp_stride: int = 16
    sel_block: int = 64
    num_selected: int = 16
    window: int = 512
    phi: str = "mean"  # "mean" or "mlp" (learnable, starts as mean pooling)
    phi_hidden: int = 0  # hidden width of the phi MLP; 0 means cmp_block * head_dim // 4
    shared_kv: bool = False  # one K/V projection for all three branches
    gate_hidden: int = 0  # hidden width of the gate MLP; 0 means hidden_size // 4

    def __post_init__(self) -> None:
        _positive_int(self, "cmp_block", "cmp_stride", "sel_block", "num_selected")
        _require(isinstance(self.window, int) and not isinstance(self.window, bool) and self.window >= 0,
                 "window", "must be an integer >= 0 (0 turns the window branch off)", self.window)
        _require(self.cmp_block % self.cmp_stride == 0, "cmp_block",
                 f"cmp_stride (d={self.cmp_stride}) must divide cmp_block (l)", self.cmp_block)
        _require(self.sel_block % self.cmp_stride == 0, "sel_block",
                 f"cmp_stride (d={self.cmp_stride}) must divide sel_block (l')", self.sel_block)
        _require(self.cmp_block <= self.sel_block, "cmp_block",
                 f"must be <= sel_block (l'={self.sel_block})", self.cmp_block)
        _require(self.num_selected >= 3, "num_selected",
                 "must be >= 3 (block 0 and two local blocks are always selected)", self.num_selected)
        _require(self.phi in ("mean", "mlp"), "phi", "must be 'mean' or 'mlp'", self.phi)
        for name in ("phi_hidden", "gate_hidden"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 0, name, "must be an integer >= 0", value)
        _require(isinstance(self.shared_kv, bool), "shared_kv", "must be true or false", self.shared_kv)


RECOMPUTE = ("full", "keep_attention", "auto", "min", "none")


@dataclass
class ModelConfig(ConfigBase):
    """A decoder-only LM with NSA (or dense, for baselines) attention in every layer."""

    vocab_size: int = 32000
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8  # query heads (HQ)
    num_kv_heads: int = 2  # KV heads (H); group size G = HQ / H
    head_dim: int = 64  # Dk
    v_head_dim: int = 0  # Dv; 0 means head_dim
    intermediate_size: int = 0  # SwiGLU width; 0 means a multiple of 256 near 8/3 * hidden
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    attention: str = "nsa"  # "nsa" or "dense" (causal SDPA with the same projections)
    # one GEMM for every input projection of an attention layer (q, each K/V, the gate's
    # first layer); the weights stay stored apart, so checkpoints do not depend on it
    fused_projection: bool = True
    # what the backward recomputes when activation checkpointing is on (the train config's
    # activation_checkpointing): "full" (each decoder block), "keep_attention" (projections,
    # norms and MLP recomputed, the attention not: NSA on the kernels and dense on SDPA keep
    # only its results (outputs, log-sum-exps), elsewhere its saved tensors too),
    # "auto" (keep_attention in as many of the last layers as what they keep fits
    # AUTO_KEEP_FRACTION of the GPU memory left after set-up, full in the others; full on the
    # CPU and under ZeRO-3), "min" ("auto", then where every layer keeps its attention and
    # the budget has room, nothing recomputed in as many of the last layers as their saved
    # activations fit; measured by one forward of a layer per input shape; as "auto" under
    # tensor / sequence / context parallelism, whose layers hold collectives), "none" (nothing,
    # checkpointing or not). A fully recomputed NSA layer attends with its forward's block
    # selection instead of selecting again.
    recompute: str = "auto"
    nsa: NSAConfig = field(default_factory=NSAConfig)

    # How the model is computed, not what: a run may resume or convert across them.
    EXECUTION_FIELDS = ("fused_projection", "recompute")

    @classmethod
    def function_fields(cls, cfg: dict) -> dict:
        """A model-config dict without ``EXECUTION_FIELDS``: what must match to continue a run."""
        return {k: v for k, v in cfg.items() if k not in cls.EXECUTION_FIELDS}

    def __post_init__(self) -> None:
        if isinstance(self.nsa, dict):
            self.nsa = NSAConfig.from_dict(self.nsa, where="nsa")
        _require(isinstance(self.nsa, NSAConfig), "nsa",
                 "must be a mapping of NSA fields (e.g. {cmp_block: 32, window: 512})", self.nsa)
        _numbers(self, "rope_theta", "norm_eps", "init_std")
        _positive_int(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                      "head_dim", "max_seq_len")
        _require(self.num_heads % self.num_kv_heads == 0, "num_heads",
                 f"must be a multiple of num_kv_heads ({self.num_kv_heads})", self.num_heads)
        _require(isinstance(self.v_head_dim, int) and self.v_head_dim >= 0, "v_head_dim",
                 "must be an integer >= 0 (0 means head_dim)", self.v_head_dim)
        _require(isinstance(self.intermediate_size, int) and self.intermediate_size >= 0,
                 "intermediate_size", "must be an integer >= 0 (0 means automatic)", self.intermediate_size)
        _require(self.head_dim % 2 == 0, "head_dim", "must be even (RoPE rotates pairs)", self.head_dim)
        _require(self.rope_theta > 0, "rope_theta", "must be > 0", self.rope_theta)
        _require(self.norm_eps > 0, "norm_eps", "must be > 0", self.norm_eps)
        _require(self.init_std > 0, "init_std", "must be > 0", self.init_std)
        _require(self.attention in ("nsa", "dense"), "attention", "must be 'nsa' or 'dense'", self.attention)
        _require(self.recompute in RECOMPUTE, "recompute",
                 "must be one of " + ", ".join(repr(m) for m in RECOMPUTE), self.recompute)
        for name in ("tie_embeddings", "fused_projection"):
            _require(isinstance(getattr(self, name), bool), name, "must be true or false", getattr(self, name))

    @property
    def dv(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def ffn_size(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        return 256 * ((int(self.hidden_size * 8 / 3) + 255) // 256)

"""Import a dense Llama-style Hugging Face checkpoint as an NSA model.

Dense Q/K/V/O go into the NSA projections (every branch's K/V starts as a copy of the dense
K/V), norms and MLP are copied, phi starts as mean pooling (its MLP output is zero-initialised)
and the gates start at 0.5, as a fresh model's do. A report lists what was copied, created
and dropped.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig, NSAConfig
from ..fileio import atomic_dir
from ..models import NSADecoderLM
from .io import load_safetensors_dir, save_consolidated


@dataclass
class ImportReport:
    copied: list[tuple[str, str]] = field(default_factory=list)  # (hf name, our name)
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"copied {len(self.copied)} tensors, created {len(self.created)}, dropped {len(self.dropped)}"]
        lines += [f"  created: {n}" for n in self.created]
        lines += [f"  dropped: {n}" for n in self.dropped]
        return "\n".join(lines)


def _hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    with open(cfg_path) as fh:
        return json.load(fh)


def model_config_from_hf(hf: dict, nsa: NSAConfig) -> ModelConfig:
    """Our ModelConfig for a Llama-style HF config dict; refuses what we cannot represent."""
    if hf.get("model_type") not in ("llama", "mistral", "qwen2", None):
        raise ValueError(f"from-hf supports Llama-style models, got model_type={hf.get('model_type')!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"{flag}=true is not supported: nsa_dist projections have no bias")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"rope scaling {rope.get('rope_type') or rope.get('type')!r} is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r}: only SwiGLU (silu) MLPs are supported")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        intermediate_size=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 4096),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        nsa=nsa)


def _mapping(cfg: ModelConfig) -> dict[str, list[str]]:
    """HF name -> our names it is copied to."""
    m = {"model.embed_tokens.weight": ["embed.weight"], "model.norm.weight": ["norm.weight"]}
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = ["lm_head.weight"]
    kv = ["shared"] if cfg.nsa.shared_kv else ["cmp", "sel", "win"]
    for i in range(cfg.num_layers):
        hf, us = f"model.layers.{i}.", f"layers.{i}."
        m[hf + "self_attn.q_proj.weight"] = [us + "attn.q_proj.weight"]
        m[hf + "self_attn.k_proj.weight"] = [us + f"attn.k_proj.{b}.weight" for b in kv]
        m[hf + "self_attn.v_proj.weight"] = [us + f"attn.v_proj.{b}.weight" for b in kv]
        m[hf + "self_attn.o_proj.weight"] = [us + "attn.o_proj.weight"]
        for p in ("gate_proj", "up_proj", "down_proj"):
            m[hf + f"mlp.{p}.weight"] = [us + f"mlp.{p}.weight"]
        m[hf + "input_layernorm.weight"] = [us + "attn_norm.weight"]
        m[hf + "post_attention_layernorm.weight"] = [us + "mlp_norm.weight"]
    return m


def import_hf(src: str, nsa: NSAConfig, dtype: torch.dtype = torch.float32,
              seed: int = 0, quiet: bool = True) -> tuple[ModelConfig, NSADecoderLM, ImportReport]:
    """Build an NSA model from the dense HF checkpoint in directory ``src``."""
    cfg = model_config_from_hf(_hf_config(src), nsa)
    hf_state = load_safetensors_dir(src, quiet=quiet)
    torch.manual_seed(seed)
    model = NSADecoderLM(cfg)
    ours = model.state_dict()
    report = ImportReport()
    filled = set()
    for hf_name, targets in _mapping(cfg).items():
        if hf_name not in hf_state:
            raise ValueError(f"{src}: tensor {hf_name} is missing from the checkpoint")
        t = hf_state[hf_name]
        if not t.is_floating_point():
            raise ValueError(f"{src}: tensor {hf_name} has dtype {t.dtype}, expected a floating-point type")
        for name in targets:
            if tuple(t.shape) != tuple(ours[name].shape):
                raise ValueError(f"{hf_name} has shape {tuple(t.shape)} but {name} needs {tuple(ours[name].shape)}")
            ours[name] = t.to(torch.float32)
            filled.add(name)
            report.copied.append((hf_name, name))
    mapped = set(_mapping(cfg))
    report.dropped = sorted(n for n in hf_state if n not in mapped)
    if cfg.tie_embeddings:
        filled.add("lm_head.weight")
    report.created = sorted(n for n in ours if n not in filled)
    model.load_state_dict(ours)
    return cfg, model.to(dtype), report


def from_hf(src: str, out: str, nsa: NSAConfig, dtype: torch.dtype = torch.float32,
            force: bool = False, quiet: bool = True) -> ImportReport:
    """The ``from-hf`` subcommand: write a consolidated NSA checkpoint to ``out``."""
    if os.path.exists(out) and not force:  # before reading the weights
        raise FileExistsError(f"output {os.path.abspath(out)} already exists; pass --force to replace it")
    cfg, model, report = import_hf(src, nsa, dtype, quiet=quiet)
    with atomic_dir(out, force) as tmp:
        save_consolidated(model.state_dict(), cfg, tmp, {"imported_from": os.path.abspath(src)})
        with open(os.path.join(tmp, "import_report.txt"), "w") as fh:
            fh.write(report.summary() + "\n")
    return report

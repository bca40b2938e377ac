"""Throughput, FLOP rate, MFU and memory of one rank.

MFU = achieved training FLOP/s / the device's peak dense FLOP/s at the run's precision.
Training FLOPs per token come from ``model.flops_per_token(seq_len)`` (forward + backward,
attention counted as NSA computes it), taken before ZeRO-3 partitions the weights.
"""
from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from typing import Optional

import torch

# Dense peak TFLOP/s per GPU (vendor data sheets, no sparsity). "fp32" means TF32 tensor
# cores, what torch uses for fp32 matmuls with allow_tf32 on.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 494.7},
    "H100 PCIe": {"bf16": 756.0, "fp32": 378.0},
    "H100 NVL": {"bf16": 835.0, "fp32": 417.5},
    "H100": {"bf16": 989.0, "fp32": 494.7},  # SXM; after the PCIe/NVL names on purpose
    "A100": {"bf16": 312.0, "fp32": 156.0},
}


def device_peak_tflops(device: torch.device, precision: str, config_peak: float = 0.0) -> Optional[float]:
    """Peak TFLOP/s of ``device`` at ``precision`` ("bf16"/"fp32"), or ``config_peak`` when
    given (> 0), or None when unknown (CPU without a configured peak: MFU is n/a)."""
    if config_peak > 0:
        return float(config_peak)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks.get(precision)
    return None


def mfu_peak(device: torch.device, precision: str, config_peak: float = 0.0) -> tuple[Optional[float], str]:
    """(``device_peak_tflops``, the line that says where MFU's peak comes from, or that MFU is
    not logged and how to get it)."""
    peak = device_peak_tflops(device, precision, config_peak)
    if config_peak > 0:
        return peak, f"[train] MFU (perf/mfu) against peak_tflops={config_peak:g} TFLOP/s from the train config"
    if peak is not None:
        return peak, (f"[train] MFU (perf/mfu) against {torch.cuda.get_device_name(device)}'s {precision} peak "
                      f"{peak:g} TFLOP/s (data sheet; peak_tflops in the train config overrides it)")
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return None, (f"[train] MFU not logged: no peak FLOP rate is known for {what} at {precision}; "
                  f"set peak_tflops in the train config to log perf/mfu")


def memory_gb(device: torch.device) -> dict[str, float]:
    """Memory of this rank in GB: CUDA allocated/peak, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return {"allocated_gb": torch.cuda.memory_allocated(device) / 1e9,
                "max_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return {"max_rss_gb": rss * scale / 1e9}


@dataclass
class StepRate:
    """Per-rank rates of one logging window."""

    tokens_per_s: float
    tflops: float
    mfu: Optional[float]


def step_rate(tokens: int, seconds: float, flops_per_token: float,
              peak_tflops: Optional[float]) -> StepRate:
    """tokens processed by one rank in ``seconds`` -> tokens/s, TFLOP/s and MFU (or None)."""
    if seconds <= 0:
        return StepRate(0.0, 0.0, None)
    tps = tokens / seconds
    tflops = tps * flops_per_token / 1e12
    return StepRate(tps, tflops, tflops / peak_tflops if peak_tflops else None)

"""Where a training step's time goes, by part of the model, from one torch.profiler trace.

Forward hooks open a profiler range named after the part each module belongs to
(``part_of``: attention, mlp, norm, embedding, lm_head, and the model itself for what lies
between them: residual adds, the loss). A kernel is charged to the innermost part range
around the CPU op that launched it. Backward ops run on the autograd engine's thread outside
those ranges; each carries the sequence number of the forward op it differentiates, so it is
charged to that op's part. Recomputed forwards (activation checkpointing) pass through the
hooks again and count where they run. Kernels are then split by kind: the attention kernels
themselves (our Triton kernels, dense flash/cuDNN attention), matrix products, and the rest.

Rows (milliseconds per step): attention kernels; attention projections (matrix products in
the attention layers); attention other (RoPE, phi, gates, casts, layout copies); MLP; norms;
embedding, LM head and loss; optimizer (the caller's ``optimizer`` range); other GPU work
(DeepSpeed's gradient copies and reductions, memcpy); GPU idle (step time not covered by
kernels: launch gaps and host waits). ``data`` is the caller's host time to fetch a batch.
"""
from __future__ import annotations

import re
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

PREFIX = "nsa_part::"
ROWS = ("attention kernels", "attention projections", "attention other", "MLP", "norms",
        "embedding, LM head, loss", "optimizer", "other GPU work", "GPU idle", "data")
_DENSE_ATTENTION = re.compile(r"flash|fmha|cudnn.*sdpa|sdpa|attention", re.I)
_MATMUL = re.compile(r"gemm|cutlass|xmma|nvjet|cublas|wgmma|matmul|addmm|\bmm\b|aten::mm|aten::bmm", re.I)


def part_of(name: str, module: nn.Module) -> Optional[str]:
    """The part a module's work belongs to, from its class and qualified name (None: its
    children say)."""
    kind = type(module).__name__
    if kind in ("NSAAttention", "DenseAttention"):
        return "attention"
    if kind == "SwiGLU" or name.endswith(".mlp"):
        return "mlp"
    if "Norm" in kind:
        return "norm"
    if name.split(".")[-1] in ("embed", "lm_head"):
        return "head"
    return None


@contextmanager
def part_ranges(model: nn.Module, classify: Callable[[str, nn.Module], Optional[str]] = part_of
                ) -> Iterator[None]:
    """Profiler ranges around the forward of every module that ``classify`` names, and one
    ("model") around the whole model. Removed on exit."""
    handles, stacks = [], defaultdict(list)

    def enter(label):
        def hook(module, args):
            rf = torch.autograd.profiler.record_function(PREFIX + label)
            rf.__enter__()
            stacks[id(module)].append(rf)
        return hook

    def leave(module, args, out):
        if stacks[id(module)]:
            stacks[id(module)].pop().__exit__(None, None, None)

    named = [("", model, "model")] + [(n, m, classify(n, m)) for n, m in model.named_modules() if n]
    for _, module, label in named:
        if label is not None:
            handles.append(module.register_forward_pre_hook(enter(label)))
            handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class StepProfile:
    """Milliseconds per step by row (``ROWS``), the measured step time and the kernel sum."""

    rows: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)  # kernels per step by row
    step_ms: float = 0.0
    kernel_ms: float = 0.0
    launches: float = 0.0

    def as_row(self) -> dict:
        return {"step_ms": round(self.step_ms, 3), "kernel_ms": round(self.kernel_ms, 3),
                "launches_per_step": round(self.launches, 1),
                **{k: round(self.rows.get(k, 0.0), 3) for k in ROWS}}


def _part(event, seq_part: dict) -> Optional[str]:
    e = event
    while e is not None:
        if e.name.startswith(PREFIX):
            return e.name[len(PREFIX):]
        if e.name.startswith("autograd::engine::evaluate_function"):
            return seq_part.get((e.fwd_thread, e.sequence_nr))
        e = e.cpu_parent
    return None


def _kernels(events) -> Iterable[tuple]:
    """(launching CPU event, kernel name, microseconds): GPU kernels where there are any,
    else (a CPU-only run) each CPU op's own time, so the attribution is testable anywhere."""
    gpu = [(e, k.name, k.duration) for e in events for k in e.kernels]
    if gpu:
        return gpu
    return [(e, e.name, e.self_cpu_time_total) for e in events
            if not e.name.startswith(PREFIX) and not e.name.startswith("autograd::")
            and e.device_type == torch.autograd.DeviceType.CPU and e.self_cpu_time_total > 0]


def attribute(events, attention_kernels: set, steps: int, step_ms: float, data_ms: float = 0.0
              ) -> StepProfile:
    """Sort the kernels of ``events`` (``prof.events()`` over ``steps`` steps) into ROWS.

    attention_kernels: names of our Triton kernels (``triton_kernel_names()``).
    """
    seq_part = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            part = _part(e, {})
            if part is not None:
                seq_part.setdefault((e.thread, e.sequence_nr), part)
    rows, counts = defaultdict(float), defaultdict(int)
    total, launches = 0.0, 0
    for event, name, us in _kernels(events):
        part = _part(event, seq_part)
        short = name.split("(")[0].split("<")[0].strip().split(" ")[-1]
        if short in attention_kernels or (part == "attention" and _DENSE_ATTENTION.search(name)):
            row = "attention kernels"
        elif part == "attention":
            row = "attention projections" if _MATMUL.search(name) else "attention other"
        elif part in ("mlp", "norm", "optimizer"):
            row = {"mlp": "MLP", "norm": "norms", "optimizer": "optimizer"}[part]
        elif part in ("head", "model"):
            row = "embedding, LM head, loss"
        else:
            row = "other GPU work"
        rows[row] += us / 1e3
        counts[row] += 1
        total += us / 1e3
        launches += 1
    prof = StepProfile({k: v / steps for k, v in rows.items()}, {k: v / steps for k, v in counts.items()},
                       step_ms, total / steps, launches / steps)
    prof.rows["GPU idle"] = max(0.0, step_ms - prof.kernel_ms)
    prof.rows["data"] = data_ms
    return prof


def triton_kernel_names() -> set:
    """Names of the @triton.jit functions in nsa_dist.kernels (empty without triton)."""
    try:
        import importlib
        import pkgutil

        pkg = importlib.import_module("nsa_dist.kernels")
    except Exception:  # noqa: BLE001 - no triton: no Triton kernels to name
        return set()
    names = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        try:
            mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        except Exception:  # noqa: BLE001
            continue
        for attr, value in vars(mod).items():
            if type(value).__name__ in ("JITFunction", "Autotuner", "Heuristics"):
                names.add(attr)
    return names


def format_table(profiles: dict) -> str:
    """``{label: StepProfile}`` -> a fixed-width table, one column per label."""
    labels = list(profiles)
    width = max(12, *(len(lab) for lab in labels))
    lines = [f"{'ms per step':26s}" + "".join(f"{lab:>{width + 2}s}" for lab in labels)]
    for row in ("step time",) + ROWS + ("kernel launches",):
        vals = []
        for lab in labels:
            p = profiles[lab]
            v = {"step time": p.step_ms, "kernel launches": p.launches}.get(row, p.rows.get(row, 0.0))
            vals.append(f"{v:>{width + 2}.1f}")
        lines.append(f"{row:26s}" + "".join(vals))
    return "\n".join(lines)

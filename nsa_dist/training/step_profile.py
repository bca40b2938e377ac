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
kernels: launch gaps and host waits). Kernels launched outside any op (Triton kernels called
from plain Python) are in the device trace only: they are charged by name ("<- (no op)").
``data`` is the caller's host time to fetch a batch.
On a GPU the idle time is also split by the row of the kernel each gap ends at ("idle
before"): the part whose launch the GPU waited for (host work or a host sync before it).
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
    wrapped = []
    for _, module, label in named:
        if label is not None:
            handles.append(module.register_forward_pre_hook(enter(label)))
            handles.append(module.register_forward_hook(leave, always_call=True))
        # Selective recomputation calls an attention layer's parts, not its forward.
        for part in ("prepare", "attend", "finish") if label == "attention" else ():
            if hasattr(module, part):
                setattr(module, part, _ranged(getattr(module, part), label))
                wrapped.append((module, part))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module, part in wrapped:
            delattr(module, part)


@dataclass
class StepProfile:
    """Milliseconds per step by row (``ROWS``), the measured step time and the kernel sum."""

    rows: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)  # kernels per step by row
    top: dict = field(default_factory=dict)  # (row, "kernel <- launching op") -> (launches, ms) per step
    step_ms: float = 0.0
    kernel_ms: float = 0.0
    launches: float = 0.0
    idle: dict = field(default_factory=dict)  # row -> GPU idle ms per step before its kernels

    def as_row(self) -> dict:
        return {"step_ms": round(self.step_ms, 3), "kernel_ms": round(self.kernel_ms, 3),
                "launches_per_step": round(self.launches, 1),
                **{k: round(self.rows.get(k, 0.0), 3) for k in ROWS},
                **{f"launches: {k}": round(self.counts.get(k, 0.0), 1) for k in ROWS[:-2]},
                **{f"idle before: {k}": round(self.idle.get(k, 0.0), 3) for k in ROWS[:-2]}}


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


def attribute(events, attention_kernels: set, steps: int, step_ms: float, data_ms: float = 0.0,
              spans: Optional[list] = None) -> StepProfile:
    """Sort the kernels of ``events`` (``prof.events()`` over ``steps`` steps) into ROWS.

    attention_kernels: names of our Triton kernels (``triton_kernel_names()``); spans:
    ``device_spans`` of the same profile, to split the GPU idle time by part.
    """
    seq_part = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            part = _part(e, {})
            if part is not None:
                seq_part.setdefault((e.thread, e.sequence_nr), part)
    rows, counts, top = defaultdict(float), defaultdict(int), {}
    total, launches = 0.0, 0
    for event, name, us in _kernels(events):
        row, short = _row(_part(event, seq_part), name, attention_kernels)
        rows[row] += us / 1e3
        counts[row] += 1
        key = (row, short if event is None or event.name == name else f"{short} <- {event.name}")
        n, ms = top.get(key, (0, 0.0))
        top[key] = (n + 1, ms + us / 1e3)
        total += us / 1e3
        launches += 1
    if spans:  # kernels launched outside any op (a Triton launch from plain Python code)
        for name, (n, us) in _unlinked(events, spans).items():
            row, short = _row(None, name, attention_kernels)
            rows[row] += us / 1e3
            counts[row] += n
            key = (row, f"{short} <- (no op)")
            k_n, k_ms = top.get(key, (0, 0.0))
            top[key] = (k_n + n, k_ms + us / 1e3)
            total += us / 1e3
            launches += n
    prof = StepProfile({k: v / steps for k, v in rows.items()}, {k: v / steps for k, v in counts.items()},
                       {k: (n / steps, ms / steps) for k, (n, ms) in top.items()},
                       step_ms, total / steps, launches / steps)
    prof.rows["GPU idle"] = max(0.0, step_ms - prof.kernel_ms)
    prof.rows["data"] = data_ms
    if spans:
        prof.idle = {k: v / steps for k, v in _idle_before(spans, events, seq_part, attention_kernels).items()}
    return prof


def _unlinked(events, spans) -> dict:
    """Device work with no launching op: name -> (count, microseconds), the spans of a name
    beyond the kernels that ops account for. torch's profiler links a kernel to the op around
    its launch; a Triton kernel launched from plain Python code (no op around it) is in the
    device trace only, and would otherwise count as GPU idle."""
    linked = defaultdict(lambda: [0, 0.0])
    for e in events:
        for k in e.kernels:
            linked[k.name][0] += 1
            linked[k.name][1] += k.duration
    seen = defaultdict(lambda: [0, 0.0])
    for start, stop, name, _ in spans:
        seen[name][0] += 1
        seen[name][1] += stop - start
    out = {}
    for name, (n, us) in seen.items():
        n_l, us_l = linked.get(name, (0, 0.0))
        if n > n_l:  # launches no op accounts for, and the time beyond the linked ones'
            out[name] = (n - n_l, max(0.0, us - us_l))
    return out


def _row(part: Optional[str], name: str, attention_kernels: set) -> tuple[str, str]:
    """(row, short kernel name) of a kernel launched inside ``part``."""
    short = name.split("(")[0].split("<")[0].strip().split(" ")[-1]
    if short in attention_kernels or (part == "attention" and _DENSE_ATTENTION.search(name)):
        return "attention kernels", short
    if part == "attention":
        return ("attention projections" if _MATMUL.search(name) else "attention other"), short
    if part in ("mlp", "norm", "optimizer"):
        return {"mlp": "MLP", "norm": "norms", "optimizer": "optimizer"}[part], short
    if part in ("head", "model"):
        return "embedding, LM head, loss", short
    return "other GPU work", short


def _annotation(k) -> bool:
    """Whether a kineto event is a ``record_function`` range (its GPU-timeline copy included:
    "gpu_user_annotation"), not device work: counted as work it would hide the GPU's idle time."""
    if getattr(k, "is_user_annotation", None) is not None and k.is_user_annotation():
        return True
    kind = k.activity_type() if hasattr(k, "activity_type") else ""
    return "annotation" in str(kind).lower()


def device_spans(prof) -> list:
    """(start_us, end_us, name, launching op's id) of every device event of a finished
    ``torch.profiler.profile`` (kernels, copies, memsets); empty without a device trace."""
    cuda = torch.autograd.DeviceType.CUDA
    out = []
    for k in prof.profiler.kineto_results.events():
        if k.device_type() == cuda and not _annotation(k):
            start = k.start_ns() / 1e3
            out.append((start, start + k.duration_ns() / 1e3, k.name(), k.linked_correlation_id()))
    return out


def _idle_before(spans, events, seq_part: dict, attention_kernels: set) -> dict:
    """GPU idle milliseconds by the row of the kernel that ends each gap: the GPU sat
    waiting for that kernel's launch (host work, or a host sync before it). ``spans``:
    ``device_spans``; the activity of every stream is merged first, so a gap is time no
    stream was busy. The gaps between profiled steps (the loop's own host work) land on
    the next step's first kernel."""
    # the op a kernel belongs to is the one the profiler appended it to (its id is the
    # kernel's linked correlation id)
    launcher = {e.id: e for e in events if e.kernels}
    idle, end = defaultdict(float), None
    for start, stop, name, op in sorted(spans):
        if end is not None and start > end:
            row, _ = _row(_part(launcher.get(op), seq_part), name, attention_kernels)
            idle[row] += (start - end) / 1e3
        end = stop if end is None else max(end, stop)
    return dict(idle)


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
    lines.append("launches per step")
    for row in ROWS[:-2]:
        lines.append(f"  {row:24s}" + "".join(f"{profiles[lab].counts.get(row, 0.0):>{width + 2}.0f}"
                                              for lab in labels))
    if any(profiles[lab].idle for lab in labels):
        lines.append("GPU idle ms before kernels of")
        for row in ROWS[:-2]:
            lines.append(f"  {row:24s}" + "".join(f"{profiles[lab].idle.get(row, 0.0):>{width + 2}.1f}"
                                                  for lab in labels))
    return "\n".join(lines)


def format_top(profiles: dict, n: int, by: str = "launches") -> str:
    """The ``n`` kernels (with the op that launched them) of each profile with the most
    launches (``by="launches"``) or milliseconds (``by="time"``) per step: row, name,
    launches and milliseconds per step."""
    out = []
    col = 0 if by == "launches" else 1
    for lab, p in profiles.items():
        out.append(f"[{lab}] top {n} kernels by {by} per step")
        ranked = sorted(p.top.items(), key=lambda kv: -kv[1][col])[:n]
        for (row, name), (count, ms) in ranked:
            out.append(f"  {count:8.0f} x {ms:9.2f} ms  {row:24s} {name[:120]}")
    return "\n".join(out)


# ---------------------------------------------------------------------- memory at the peak
_OURS = ("/nsa_dist/", "/kernels/", "/deepspeed/")


def _where(frames: list) -> str:
    """A trace entry's origin: the innermost frame in our package, the kernels or DeepSpeed
    (file:line function), else the innermost Python frame."""
    frames = [f for f in frames if f.get("filename", "").endswith(".py")]
    pick = next((f for f in frames if any(k in f["filename"] for k in _OURS)), frames[0] if frames else None)
    if pick is None:
        return "?"
    path = pick["filename"]
    for k in _OURS:
        if k in path:
            path = k.strip("/") + "/" + path.split(k, 1)[1]
            break
    return f"{path}:{pick.get('line', 0)} {pick.get('name', '')}"


def peak_allocations(trace: list, top: int = 20) -> tuple[int, list]:
    """The live allocations at the highest point of one allocator trace (``device_traces``
    of ``torch.cuda.memory._snapshot()``): (peak bytes above the trace's start, [(origin,
    bytes, blocks)] largest first). Blocks allocated before the trace began are not in it."""
    live, total, peak, at = {}, 0, 0, -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
        elif e["action"] in ("free_requested", "free_completed") and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
        if total > peak:
            peak, at = total, i
    live = {}
    for e in trace[:at + 1]:  # replay to the peak: what was live there
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] in ("free_requested", "free_completed"):
            live.pop(e["addr"], None)
    groups = defaultdict(lambda: [0, 0])
    for e in live.values():
        g = groups[_where(e.get("frames", []))]
        g[0] += e["size"]
        g[1] += 1
    ranked = sorted(((k, b, n) for k, (b, n) in groups.items()), key=lambda r: -r[1])
    return peak, ranked[:top]


def memory_at_peak(trainer, top: int = 20) -> str:
    """One more training step with the CUDA allocator's history on: the step's peak and
    what was live there by origin, as text."""
    from ..data import build_dataloader

    loop, env = trainer.loop, trainer.env
    loader = iter(build_dataloader(trainer.data.train, loop.cfg.micro_batch_size, env.dp_rank, env.dp_world))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        loop._step(loader, False)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][torch.cuda.current_device()]
    peak, ranked = peak_allocations(trace, top)
    lines = [f"allocated before the step {base / 2**30:.2f} GiB; peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB "
             f"(traced {(base + peak) / 2**30:.2f}); live at the peak, by origin:"]
    lines += [f"  {b / 2**30:8.3f} GiB {n:5d} blocks  {k}" for k, b, n in ranked]
    return "\n".join(lines)


# ---------------------------------------------------------------------- the command
def _ranged(fn: Callable, label: str) -> Callable:
    def call(*args, **kwargs):
        with torch.autograd.profiler.record_function(PREFIX + label):
            return fn(*args, **kwargs)
    return call


def profile_trainer(trainer, warmup: int, steps: int) -> StepProfile:
    """Run ``warmup`` + ``steps`` unprofiled steps of ``trainer`` (the loop's own step:
    model, DeepSpeed engine, optimizer) for the step time, then ``steps`` profiled ones for
    the split. Single process."""
    import time

    from torch.profiler import ProfilerActivity, profile

    from ..data import build_dataloader

    loop, env = trainer.loop, trainer.env
    cfg = loop.cfg
    loader = iter(build_dataloader(trainer.data.train, cfg.micro_batch_size, env.dp_rank, env.dp_world))
    cuda = env.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t = time.perf_counter()
    for _ in range(steps):
        next(loader)
    data_ms = (time.perf_counter() - t) / steps * 1e3 * cfg.grad_accum_steps
    loop.engine.train()
    for _ in range(warmup):
        loop._step(loader, False)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        loop._step(loader, False)
    sync()
    step_ms = (time.perf_counter() - t) / steps * 1e3
    engine = loop.engine
    engine.step = _ranged(engine.step, "optimizer")  # an instance attribute: removed below
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with profile(activities=activities) as prof, part_ranges(engine.module):
            for _ in range(steps):
                loop._step(loader, False)
            sync()
    finally:
        del engine.step
    return attribute(prof.events(), triton_kernel_names(), steps, step_ms, data_ms,
                     spans=device_spans(prof) if cuda else None)


ALLOCATOR_EVENTS = ("num_device_alloc", "num_device_free", "num_alloc_retries")


def step_times(trainer, steps: int) -> list[dict]:
    """``steps`` unprofiled steps of ``trainer``, each timed alone: wall milliseconds (host
    sync to sync), the host's time to issue its forward, backward and optimizer step (the
    optimizer's includes DeepSpeed's wait for the gradients), and on CUDA the allocator's
    device allocations, frees and retries during the step (growth after the first steps
    would show here). Each is one micro-batch: with ``grad_accum_steps`` > 1 DeepSpeed applies
    the optimizer on every ``grad_accum_steps``-th."""
    import time

    from ..data import build_dataloader
    from .loop import to_device

    loop, env = trainer.loop, trainer.env
    engine = loop.engine
    loader = iter(build_dataloader(trainer.data.train, loop.cfg.micro_batch_size, env.dp_rank, env.dp_world))
    cuda = env.device.type == "cuda"
    stats = torch.cuda.memory_stats if cuda else dict
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    engine.train()
    out = []
    for i in range(steps):
        before = stats()
        sync()
        t0 = time.perf_counter()
        b = to_device(next(loader), env.device)
        res = engine(b["input_ids"], labels=b["labels"], cu_seqlens=b["cu_seqlens"])
        t1 = time.perf_counter()
        engine.backward(res.loss)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        float(res.loss.detach())
        t4 = time.perf_counter()
        after = stats()
        row = {"step": i, "wall_ms": (t4 - t0) * 1e3, "issue_forward_ms": (t1 - t0) * 1e3,
               "issue_backward_ms": (t2 - t1) * 1e3, "issue_optimizer_ms": (t3 - t2) * 1e3}
        if cuda:
            row.update({k: after.get(k, 0) - before.get(k, 0) for k in ALLOCATOR_EVENTS})
        out.append(row)
    return out


def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m nsa_dist.training.step_profile",
        description="Where a training step's time goes (attention kernels, projections, MLP, norms, "
                    "head and loss, optimizer, other, GPU idle, data), NSA and dense, per context. "
                    "One process; each point is a real Trainer (DeepSpeed engine) on the train config.")
    p.add_argument("--config", required=True, help="train YAML (mock_data recommended), e.g. configs/train/bench_1b.yaml")
    p.add_argument("--seq-len", default="8k", help="contexts, e.g. 8k,32k,64k")
    p.add_argument("--attention", default="nsa,dense", help="nsa, dense or both")
    p.add_argument("--warmup", type=int, default=2, help="unprofiled warm-up steps per point")
    p.add_argument("--steps", type=int, default=2, help="timed steps, then as many profiled steps")
    p.add_argument("--out", default="", help="CSV to write (one row per point)")
    p.add_argument("--top", type=int, default=0, help="also list the N kernels with the most launches, and the N taking the most time, per point")
    p.add_argument("--memory", type=int, default=0, metavar="N",
                   help="CUDA: after the profile, one more step with the allocator's history on; list the N "
                        "largest origins of what is live at the step's memory peak")
    p.add_argument("--step-times", type=int, default=0, metavar="N",
                   help="first time N unprofiled steps one by one (wall, host issue time, allocator events)")
    p.add_argument("overrides", nargs="*", help="train-config overrides key=value")
    return p


def main(argv: Optional[list] = None) -> int:
    import csv
    import gc
    import os
    import sys
    import tempfile

    from .bench import _csv_ints, _derived_model_yaml, _is_oom
    from .config import TrainConfig
    from .trainer import Trainer

    args = build_parser().parse_args(argv)
    base = TrainConfig.from_yaml(args.config).apply_overrides(args.overrides)
    work = tempfile.mkdtemp(prefix="nsa_step_profile_")
    results, rows = {}, []
    for S in _csv_ints(args.seq_len, "seq-len"):
        for attention in [a.strip() for a in args.attention.split(",") if a.strip()]:
            label = f"{attention} {S // 1024}k" if S % 1024 == 0 else f"{attention} {S}"
            cfg = base.apply_overrides([f"seq_len={S}", f"model={_derived_model_yaml(base, attention, S, work)}", "model_overrides={}",
                                        f"output_dir={os.path.join(work, label.replace(' ', '_'))}",
                                        "tensorboard=false", "save_checkpoints=false", "eval_batches=0"])
            trainer = None
            try:
                trainer = Trainer(cfg)
                for row in step_times(trainer, args.step_times):
                    print(f"[steps] {label} " + " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in row.items()), flush=True)
                results[label] = prof = profile_trainer(trainer, args.warmup, args.steps)
                rows.append({"point": label, "seq_len": S, "attention": attention, **prof.as_row()})
                print(f"[profile] {label}: {prof.step_ms:.1f} ms/step", flush=True)
                if args.memory and torch.cuda.is_available():
                    try:
                        print(f"[memory] {label}: " + memory_at_peak(trainer, args.memory), flush=True)
                    except (SystemError, RuntimeError) as err:
                        # torch 2.11's Python stack capture failed once inside the chunked
                        # loss's recomputation (2026-12-06); the profile above stands
                        print(f"[memory] {label}: the allocator's history failed ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]}); no memory split", flush=True)
            except Exception as err:  # noqa: BLE001 - an out-of-memory point is a result
                if not _is_oom(err):
                    raise
                print(f"[profile] {label}: out of memory", flush=True)
                rows.append({"point": label, "seq_len": S, "attention": attention, "step_ms": "oom"})
            finally:
                if trainer is not None:
                    trainer.close()
                del trainer
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    if results:
        print(format_table(results))
        if args.top:
            print(format_top(results, args.top))
            print(format_top(results, args.top, by="time"))
    if args.out and rows:
        from ..fileio import atomic_open

        fields = ["point", "seq_len", "attention", "step_ms", "kernel_ms", "launches_per_step", *ROWS,
                  *(f"launches: {r}" for r in ROWS[:-2]), *(f"idle before: {r}" for r in ROWS[:-2])]
        with atomic_open(args.out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

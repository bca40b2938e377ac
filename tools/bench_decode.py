#!/usr/bin/env python
"""Decode-step latency and tokens/s of one attention layer: NSA against dense decode.

One new query per sequence over a cache of S tokens (append the token, then attend), for
every batch x context of the grid, the 1b config's attention by default (32 query / 8 KV
heads, head_dim 128, l=32 d=16 l'=64 n=16 w=512), bf16 on CUDA. Methods:

- ``nsa_kernels``: the Triton decode kernels (``nsa_dist.kernels.decode``), eager launches;
- ``nsa_graph``: the same step replayed as one CUDA graph;
- ``nsa_pytorch`` (``--pytorch``): the PyTorch reference decode path;
- ``dense_sdpa`` / ``dense_sdpa_graph``: a K/V cache and SDPA over all S positions (the G
  query heads of a KV head as SDPA's query axis: K/V read once per KV head);
- ``flash_kvcache`` / ``flash_kvcache_graph``: flash-attn's ``flash_attn_with_kvcache``
  (append + attend in one call), when flash-attn imports.

A step's time is the wall time of ``--iters`` back-to-back steps over their number (launch
overhead included, as a generate loop sees it). ``--launch KEY=VALUE`` sets a decode-kernel
launch constant (``DecodeLaunch``); ``--ab KEY=V1,V2`` adds one kernel setting per value (over
the ``--launch`` base), all timed at every point on the same caches: the ``launch`` column names
each row's setting (its fields that differ from the defaults). ``--kernel-times`` adds the CUDA
time of every kernel of one step (torch.profiler, mean of a few eager steps) to each row. Projections and MLPs are left out (the same
for NSA and dense). Read counts are exact (SPEC's counters). A method that is unavailable or
fails (a missing package, out of memory) gets a row saying why; the run goes on. The CSV is
rewritten (temporary file, then rename) after every configuration.

  python tools/bench_decode.py --csv bench_decode.csv          # batch 1,8,64 x 8k..128k
  python tools/bench_decode.py --quick --csv quick.csv         # smoke test (also on a CPU)
  python tools/bench_decode.py --batches 64 --contexts 131072 --kernel-times \
      --ab attend_upp=4,8 --ab cmp_warps=8+cmp_stages=2 --csv ab.csv   # launch settings side by side
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

FIELDS = ["batch", "context", "method", "launch", "status", "ms_per_step", "tokens_per_s", "reads_per_head",
          "read_ratio_vs_dense", "speedup_vs_dense_sdpa", "speedup_vs_best_dense", "speedup_vs_base_launch",
          "kernel_us"]
BASE = "default"  # the launch column of rows without a decode-kernel setting of their own
PROFILED_STEPS = 3  # eager steps under torch.profiler for --kernel-times


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step, device, warmup: int, iters: int) -> float:
    """Milliseconds per call of step() over ``iters`` back-to-back calls after ``warmup``."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - start) * 1e3 / iters


def _graphed(fn, device):
    """fn captured in a CUDA graph after two warm-up calls on a side stream: a replay callable."""
    import torch

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _fill_(t, gen_seed: int):
    """Random normal values in place (no second copy of a large cache)."""
    import torch
    g = torch.Generator(device=t.device).manual_seed(gen_seed)
    t.normal_(generator=g)
    return t


# ----------------------------------------------------------------------------- decode-kernel settings
def _launch_class():
    from nsa_dist.kernels.decode import DecodeLaunch  # needs triton: imported only when asked for
    return DecodeLaunch


def _field_value(cls, key: str, text: str, flag: str):
    """``text`` as the type of DecodeLaunch field ``key`` (its default's type); a clear
    SystemExit for an unknown field or a value of the wrong type."""
    import dataclasses
    import difflib

    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise SystemExit(f"{flag}: unknown DecodeLaunch field '{key}'; {hint}fields: {', '.join(fields)}")
    kind = type(fields[key].default)
    if kind is bool:
        word = text.strip().lower()
        if word not in ("true", "false", "1", "0"):
            raise SystemExit(f"{flag}: {key} takes true or false, got {text!r}")
        return word in ("true", "1")
    try:
        return kind(text.strip())
    except ValueError:
        what = {int: "an integer", float: "a number"}.get(kind, f"a {kind.__name__}")
        raise SystemExit(f"{flag}: {key} takes {what}, got {text!r}") from None


def _pairs(text: str, flag: str) -> list[tuple[str, str]]:
    """"K=V" or "K1=V1+K2=V2" -> [(K, V), ...]."""
    out = []
    for part in text.split("+"):
        key, eq, val = part.partition("=")
        if not eq or not key.strip() or not val.strip():
            raise SystemExit(f"{flag} takes KEY=VALUE (several joined by '+'), got {text!r}")
        out.append((key.strip(), val))
    return out


def _make_launch(cls, base, settings: dict, flag: str):
    """``base`` with ``settings``; DecodeLaunch's own check (a power of two, ...) as a SystemExit."""
    import dataclasses
    try:
        return dataclasses.replace(base, **settings)
    except ValueError as err:
        raise SystemExit(f"{flag} {settings}: {err}") from None


def launch_label(launch) -> str:
    """The fields of ``launch`` that differ from DecodeLaunch's defaults, "k=v+k=v", or "default"."""
    import dataclasses
    diff = [f"{f.name}={getattr(launch, f.name)}" for f in dataclasses.fields(launch)
            if getattr(launch, f.name) != f.default]
    return "+".join(diff) or BASE


def launch_variants(launch_args: list[str], ab_args: list[str]) -> list:
    """[(label, DecodeLaunch)]: the ``--launch`` base first, then one per ``--ab`` value.

    launch_args: "KEY=VALUE" (or "K1=V1+K2=V2") each, applied in order; ab_args: "KEY=V1,V2,..."
    (one setting per value) or "K1=V1+K2=V2" (one setting changing both), over the base.
    A setting equal to one already listed is not repeated. Empty lists: [] (no kernel setting
    named: the kernels run with DecodeLaunch's defaults and the rows say "default").
    """
    if not launch_args and not ab_args:
        return []
    cls = _launch_class()
    settings = {}
    for text in launch_args:
        settings.update({k: _field_value(cls, k, v, "--launch") for k, v in _pairs(text, "--launch")})
    base = _make_launch(cls, cls(), settings, "--launch")
    out = [base]
    for text in ab_args:
        pairs = _pairs(text, "--ab")
        if len(pairs) == 1:
            key, vals = pairs[0]
            variants = [{key: _field_value(cls, key, v, "--ab")} for v in vals.split(",") if v.strip()]
        else:
            if any("," in v for _, v in pairs):
                raise SystemExit(f"--ab: a value list (V1,V2) takes one KEY; '+' joins single values, got {text!r}")
            variants = [{k: _field_value(cls, k, v, "--ab") for k, v in pairs}]
        for change in variants:
            launch = _make_launch(cls, base, change, "--ab")
            if launch not in out:
                out.append(launch)
    return [(launch_label(launch), launch) for launch in out]


# ----------------------------------------------------------------------------- per-kernel times
def _short_kernel(name: str) -> str:
    """A kernel's name without "void", namespaces, template and call arguments."""
    name = name.removeprefix("void ").split("(")[0]
    depth, plain = 0, []
    for ch in name:  # drop <...> (nested)
        depth += ch == "<"
        if depth == 0:
            plain.append(ch)
        depth -= ch == ">"
    return "".join(plain).split("::")[-1].strip() or name[:40]


def summarize_kernels(events, steps: int) -> dict:
    """{kernel: microseconds per step}, largest first, from (name, microseconds) of the kernel
    launches of ``steps`` steps."""
    totals = {}
    for name, us in events:
        key = _short_kernel(name)
        totals[key] = totals.get(key, 0.0) + us
    return {k: round(v / steps, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def kernel_times(step, device) -> dict:
    """Per-kernel CUDA time of one call of ``step`` (mean of PROFILED_STEPS, after one untimed
    call), {} off CUDA (the interpreter's launches are no kernels)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return {}
    step()
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_STEPS):
            step()
        _sync(device)
    cuda = torch.autograd.DeviceType.CUDA
    return summarize_kernels(((e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == cuda),
                             PROFILED_STEPS)


def kernel_column(times: dict) -> str:
    return ";".join(f"{k}={v}" for k, v in times.items())


class Shape:
    def __init__(self, args):
        from nsa_dist import NSAConfig
        self.cfg = NSAConfig(cmp_block=args.cmp_block, cmp_stride=args.cmp_stride, sel_block=args.sel_block,
                             num_selected=args.num_selected, window=args.window, phi="mean")
        self.HQ, self.H, self.D = args.heads, args.kv_heads, args.head_dim


def nsa_methods(B: int, S: int, shape: Shape, args, device, dtype, launches=()) -> tuple:
    """([(method, launch label, step or graph maker)], cache, start lengths) over NSA caches
    holding S - 1 tokens (each step appends one; set the lengths back to ``start`` before each
    method: the capacity leaves room for one method's steps and more). ``launches``:
    [(label, DecodeLaunch)] (empty: the defaults), one kernel method pair each."""
    import torch

    from nsa_dist.inference import LayerCache, attend_step
    from nsa_dist.inference.kernel_step import append_step, attend_step_kernels, decode_kernels

    cfg, H, HQ, D = shape.cfg, shape.H, shape.HQ, shape.D
    room = 3 * (args.warmup + args.iters) + PROFILED_STEPS + 8
    cache = LayerCache.empty(cfg, B, S + room, H, D, D, device, dtype)
    for i, name in enumerate(("k_sel", "v_sel", "k_win", "v_win", "k_raw", "v_raw", "k_cmp", "v_cmp")):
        if getattr(cache, name) is not None:
            _fill_(getattr(cache, name), i)
    start = torch.full((B,), S - 1, dtype=torch.long, device=device)
    cache.set_lengths(start)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    new = {k: rnd(B, H, D) for k in ("k_sel", "v_sel", "k_win", "v_win", "k_raw", "v_raw")}
    q, gates = rnd(B, HQ, D), torch.sigmoid(rnd(B, HQ, 3))
    out = []
    kernels = decode_kernels(args.nsa_backend, device, dtype)
    if kernels is not None:
        for label, launch in launches or [(BASE, None)]:
            def kernel_step(launch=launch):
                append_step(kernels, cache, new, None, None)
                return attend_step_kernels(kernels, q, gates, cache, launch=launch)
            out.append(("nsa_kernels", label, kernel_step))
            if device.type == "cuda":
                out.append(("nsa_graph", label, lambda step=kernel_step: _graphed(step, device)))  # built when timed
    if args.pytorch or kernels is None:
        def torch_step():
            cache.append(new, None, None)
            return attend_step(q, gates, cache)
        out.append(("nsa_pytorch", BASE, torch_step))
    return out, cache, start


def dense_methods(B: int, S: int, shape: Shape, device, dtype) -> dict:
    """{method: step callable} over a dense K/V cache of S tokens ([B, S, H, D])."""
    import torch

    H, HQ, D = shape.H, shape.HQ, shape.D
    G = HQ // H
    k_cache = _fill_(torch.empty(B, S, H, D, device=device, dtype=dtype), 11)
    v_cache = _fill_(torch.empty(B, S, H, D, device=device, dtype=dtype), 12)
    q = _fill_(torch.empty(B, 1, HQ, D, device=device, dtype=dtype), 13)
    k_new = _fill_(torch.empty(B, 1, H, D, device=device, dtype=dtype), 14)
    v_new = _fill_(torch.empty(B, 1, H, D, device=device, dtype=dtype), 15)
    qd = q.view(B, H, G, D)  # the group plays SDPA's query axis; no mask: all S are visible

    def sdpa_step():
        k_cache[:, S - 1:S] = k_new
        v_cache[:, S - 1:S] = v_new
        return torch.nn.functional.scaled_dot_product_attention(qd, k_cache.transpose(1, 2), v_cache.transpose(1, 2))

    out = {"dense_sdpa": sdpa_step}
    if device.type == "cuda":
        out["dense_sdpa_graph"] = lambda: _graphed(sdpa_step, device)
    flash = _flash_with_kvcache()
    if flash is not None and device.type == "cuda":
        seqlens = torch.full((B,), S - 1, dtype=torch.int32, device=device)

        def flash_step():
            return flash(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens, causal=True)
        out["flash_kvcache"] = flash_step
        out["flash_kvcache_graph"] = lambda: _graphed(flash_step, device)
    return out


def _flash_with_kvcache():
    """flash-attn's flash_attn_with_kvcache, or None when flash-attn is not installed or
    does not import (it is optional)."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception as err:  # ImportError, or a build that fails to load its extension
        print(f"# flash-attn unavailable ({type(err).__name__}: {err}); flash_kvcache rows skipped")
        return None
    return flash_attn_with_kvcache


def _run(name: str, make, device, args):
    """(status, ms) of one method; graph methods are built here (capture may fail too)."""
    import torch
    try:
        step = make() if name.endswith("_graph") else make
        return "ok", _time_steps(step, device, args.warmup, args.iters)
    except Exception as err:  # out of memory, a missing feature: a row, not a crash
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return f"error: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}", None


def bench_point(B: int, S: int, shape: Shape, args, device, dtype, launches=(), progress=None) -> list[dict]:
    """Rows of one batch x context: every NSA method (per decode-kernel setting of ``launches``)
    and every dense method. ``progress(rows)`` after each row (a long A/B keeps what it timed
    when stopped); the speedup columns are filled at the end."""
    import torch

    from nsa_dist.inference.counters import expected_reads, step_reads

    rows = []
    nsa_reads = sum(expected_reads(S, shape.cfg))

    def row(method, status, ms, reads, label=BASE, times=None):
        rows.append({"batch": B, "context": S, "method": method, "launch": label, "status": status,
                     "ms_per_step": round(ms, 4) if ms else "", "tokens_per_s": round(B * 1e3 / ms, 1) if ms else "",
                     "reads_per_head": reads, "read_ratio_vs_dense": round(S / reads, 2),
                     "kernel_us": kernel_column(times or {})})
        if progress:
            progress(rows)

    try:
        methods, cache, start = nsa_methods(B, S, shape, args, device, dtype, launches)
    except Exception as err:
        row("nsa_kernels", f"error: {type(err).__name__}", None, nsa_reads)
        methods, cache = [], None
    for name, label, make in methods:
        if name != "nsa_graph":  # one checked step: the counters equal SPEC's closed form
            cache.set_lengths(start)
            try:
                reads = step_reads(make()[1], cache.lengths, shape.cfg).reads.sum(-1)
            except Exception as err:
                row(name, f"error: {type(err).__name__}: {str(err)[:120]}", None, nsa_reads, label)
                continue
            if not bool((reads == nsa_reads).all()):
                row(name, f"error: reads {reads.unique().tolist()} != SPEC's {nsa_reads}", None, nsa_reads, label)
                continue
        cache.set_lengths(start)
        status, ms = _run(name, make, device, args)
        times = None
        if args.kernel_times and status == "ok" and name != "nsa_graph":  # a replay shows the same kernels
            cache.set_lengths(start)
            times = _profiled(make, device, f"B={B} S={S} {name} [{label}]")
        row(name, status, ms, nsa_reads, label, times)
    del methods, cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        dense = dense_methods(B, S, shape, device, dtype)
    except Exception as err:
        row("dense_sdpa", f"error: {type(err).__name__}", None, S)
        dense = {}
    for name, make in dense.items():
        status, ms = _run(name, make, device, args)
        times = None
        if args.kernel_times and status == "ok" and not name.endswith("_graph"):
            times = _profiled(make, device, f"B={B} S={S} {name}")
        row(name, status, ms, S, BASE, times)
    del dense
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _speedups(rows)
    return rows


def _profiled(step, device, what: str) -> dict:
    """kernel_times(step), printed; a failure is printed and gives {} (the timing stands)."""
    try:
        times = kernel_times(step, device)
    except Exception as err:
        print(f"# kernel times {what}: failed ({type(err).__name__}: {err})")
        return {}
    total = sum(times.values())
    print(f"# kernel times {what}: {total:.1f} us/step: " + ", ".join(f"{k} {v}" for k, v in times.items())
          if times else f"# kernel times {what}: none (no CUDA device)", flush=True)
    return times


def _speedups(rows: list[dict]) -> None:
    """Fill the speedup columns of one point's rows: against dense SDPA, the best dense
    method, and the same method under the first (base) decode-kernel setting."""
    ms = {(r["method"], r["launch"]): r["ms_per_step"] for r in rows if r["status"] == "ok"}
    dense = {m: v for (m, _), v in ms.items() if m.startswith(("dense", "flash"))}
    best_dense = min(dense.values(), default=None)
    base = {}
    for r in rows:
        base.setdefault(r["method"], ms.get((r["method"], r["launch"])))  # the first row of each method
    for r in rows:
        mine = ms.get((r["method"], r["launch"]))
        r["speedup_vs_dense_sdpa"] = round(dense["dense_sdpa"] / mine, 2) if mine and "dense_sdpa" in dense else ""
        r["speedup_vs_best_dense"] = round(best_dense / mine, 2) if mine and best_dense else ""
        first = base.get(r["method"])
        r["speedup_vs_base_launch"] = round(first / mine, 3) if mine and first else ""


def write_csv(rows: list[dict], path: str) -> None:
    """Write atomically (no half-written CSV); the folder is made if missing."""
    from nsa_dist.fileio import atomic_open

    with atomic_open(path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict]) -> str:
    cols = ["batch", "context", "method", "launch", "ms_per_step", "tokens_per_s", "reads_per_head",
            "speedup_vs_dense_sdpa", "speedup_vs_best_dense", "speedup_vs_base_launch", "status"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"{flag} must be comma-separated integers, got {text!r}")
    if not vals or min(vals) < 1:
        raise SystemExit(f"{flag} needs positive integers, got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes")
    p.add_argument("--contexts", default="8192,32768,65536,131072", help="comma-separated cache lengths")
    p.add_argument("--quick", action="store_true", help="smoke test: batch 1,2, contexts 1024,2048, 3 iterations")
    p.add_argument("--pytorch", action="store_true", help="also time the PyTorch reference decode path")
    p.add_argument("--nsa-backend", default="auto", choices=("auto", "reference", "triton"),
                   help="NSA decode path: auto = the kernels on CUDA, PyTorch elsewhere; triton on a "
                        "CPU runs them in Triton's interpreter (TRITON_INTERPRET=1, a check, not a timing)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--heads", type=int, default=32, help="query heads (1b config: 32)")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads (1b config: 8)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--cmp-block", type=int, default=32)
    p.add_argument("--cmp-stride", type=int, default=16)
    p.add_argument("--sel-block", type=int, default=64)
    p.add_argument("--num-selected", type=int, default=16)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--launch", action="append", default=[], metavar="KEY=VALUE",
                   help="a decode-kernel launch constant (a DecodeLaunch field of kernels/decode.py) for every "
                        "NSA kernel row; repeatable, or several joined by '+'")
    p.add_argument("--ab", action="append", default=[], metavar="KEY=V1[,V2...]",
                   help="more decode-kernel settings, timed beside the --launch base at every point: one per "
                        "value, or one changing several fields (K1=V1+K2=V2); repeatable")
    p.add_argument("--kernel-times", action="store_true",
                   help="CUDA time of every kernel of one step (torch.profiler) per eager row, printed and in "
                        "the CSV's kernel_us column")
    p.add_argument("--csv", default="bench_decode.csv", help="output CSV path")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" \
        else getattr(torch, args.dtype)
    if args.quick:
        args.batches, args.contexts, args.warmup, args.iters = "1,2", "1024,2048", 1, 3
    batches, contexts = _ints(args.batches, "--batches"), _ints(args.contexts, "--contexts")
    launches = launch_variants(args.launch, args.ab)  # a bad setting ends the tool before any work
    if launches:
        from nsa_dist.inference.kernel_step import decode_kernels
        if decode_kernels(args.nsa_backend, device, dtype) is None:
            raise SystemExit(f"--launch / --ab set decode-kernel constants, but --nsa-backend {args.nsa_backend} "
                             f"runs the PyTorch path on {device.type}; use --nsa-backend triton (on a CPU under "
                             "TRITON_INTERPRET=1)")
    shape = Shape(args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    cfg = shape.cfg
    print(f"# device: {name}, dtype: {str(dtype).replace('torch.', '')}, heads {args.heads}/{args.kv_heads}, "
          f"head_dim {args.head_dim}, l={cfg.cmp_block} d={cfg.cmp_stride} l'={cfg.sel_block} "
          f"n={cfg.num_selected} w={cfg.window}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"torch {torch.__version__}")
    rows = []
    with torch.no_grad():
        for B in batches:
            for S in contexts:
                rows += bench_point(B, S, shape, args, device, dtype, launches,
                                    progress=lambda point: write_csv(rows + point, args.csv))
                write_csv(rows, args.csv)
                print(markdown_table([r for r in rows if r["batch"] == B and r["context"] == S]).split("\n", 2)[-1],
                      flush=True)
    print(markdown_table(rows))
    print(f"# wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
overhead included, as a generate loop sees it). Projections and MLPs are left out (the same
for NSA and dense). Read counts are exact (SPEC's counters). A method that is unavailable or
fails (a missing package, out of memory) gets a row saying why; the run goes on. The CSV is
rewritten (temporary file, then rename) after every configuration.

  python tools/bench_decode.py --csv bench_decode.csv          # batch 1,8,64 x 8k..128k
  python tools/bench_decode.py --quick --csv quick.csv         # smoke test (also on a CPU)
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

FIELDS = ["batch", "context", "method", "status", "ms_per_step", "tokens_per_s", "reads_per_head",
          "read_ratio_vs_dense", "speedup_vs_dense_sdpa", "speedup_vs_best_dense"]


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


class Shape:
    def __init__(self, args):
        from nsa_dist import NSAConfig
        self.cfg = NSAConfig(cmp_block=args.cmp_block, cmp_stride=args.cmp_stride, sel_block=args.sel_block,
                             num_selected=args.num_selected, window=args.window, phi="mean")
        self.HQ, self.H, self.D = args.heads, args.kv_heads, args.head_dim


def nsa_methods(B: int, S: int, shape: Shape, args, device, dtype) -> dict:
    """{method: step callable} over NSA caches holding S - 1 tokens (each step appends one;
    the capacity leaves room for every timed step)."""
    import torch

    from nsa_dist.inference import LayerCache, attend_step
    from nsa_dist.inference.kernel_step import append_step, attend_step_kernels, decode_kernels

    cfg, H, HQ, D = shape.cfg, shape.H, shape.HQ, shape.D
    room = 3 * (args.warmup + args.iters) + 8
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
    out = {}
    kernels = decode_kernels(args.nsa_backend, device, dtype)
    if kernels is not None:
        def kernel_step():
            append_step(kernels, cache, new, None, None)
            return attend_step_kernels(kernels, q, gates, cache)
        out["nsa_kernels"] = kernel_step
        if device.type == "cuda":
            out["nsa_graph"] = lambda: _graphed(kernel_step, device)  # built when timed
    if args.pytorch or kernels is None:
        def torch_step():
            cache.append(new, None, None)
            return attend_step(q, gates, cache)
        out["nsa_pytorch"] = torch_step
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


def bench_point(B: int, S: int, shape: Shape, args, device, dtype) -> list[dict]:
    import torch

    from nsa_dist.inference.counters import expected_reads, step_reads

    rows = []
    nsa_reads = sum(expected_reads(S, shape.cfg))

    def row(method, status, ms, reads):
        rows.append({"batch": B, "context": S, "method": method, "status": status,
                     "ms_per_step": round(ms, 4) if ms else "", "tokens_per_s": round(B * 1e3 / ms, 1) if ms else "",
                     "reads_per_head": reads, "read_ratio_vs_dense": round(S / reads, 2)})

    try:
        methods, cache, start = nsa_methods(B, S, shape, args, device, dtype)
    except Exception as err:
        row("nsa_kernels", f"error: {type(err).__name__}", None, nsa_reads)
        methods, cache = {}, None
    for name, make in methods.items():
        if name != "nsa_graph":  # one checked step: the counters equal SPEC's closed form
            cache.set_lengths(start)
            try:
                reads = step_reads(make()[1], cache.lengths, shape.cfg).reads.sum(-1)
            except Exception as err:
                row(name, f"error: {type(err).__name__}: {str(err)[:120]}", None, nsa_reads)
                continue
            if not bool((reads == nsa_reads).all()):
                row(name, f"error: reads {reads.unique().tolist()} != SPEC's {nsa_reads}", None, nsa_reads)
                continue
        cache.set_lengths(start)
        status, ms = _run(name, make, device, args)
        row(name, status, ms, nsa_reads)
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
        row(name, status, ms, S)
    del dense
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ms = {r["method"]: r["ms_per_step"] for r in rows if r["status"] == "ok"}
    best_dense = min((v for k, v in ms.items() if k.startswith(("dense", "flash"))), default=None)
    for r in rows:
        mine = ms.get(r["method"])
        r["speedup_vs_dense_sdpa"] = round(ms["dense_sdpa"] / mine, 2) if mine and "dense_sdpa" in ms else ""
        r["speedup_vs_best_dense"] = round(best_dense / mine, 2) if mine and best_dense else ""
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    """Write atomically (no half-written CSV); the folder is made if missing."""
    from nsa_dist.fileio import atomic_open

    with atomic_open(path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict]) -> str:
    cols = ["batch", "context", "method", "ms_per_step", "tokens_per_s", "reads_per_head",
            "speedup_vs_dense_sdpa", "speedup_vs_best_dense", "status"]
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
                rows += bench_point(B, S, shape, args, device, dtype)
                write_csv(rows, args.csv)
                print(markdown_table([r for r in rows if r["batch"] == B and r["context"] == S]).split("\n", 2)[-1],
                      flush=True)
    print(markdown_table(rows))
    print(f"# wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

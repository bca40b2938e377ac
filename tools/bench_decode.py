#!/usr/bin/env python
"""Decode-step latency and K/V positions read per step: NSA caches vs dense attention.

One attention layer, one new query per sequence over a cache of S tokens:
- NSA: append the token to the per-branch caches, then the three branches
  (``nsa_dist.inference.attend_step``); reads are what its masks let through;
- dense: append to a K/V cache, then one-query GQA attention (SDPA) over all S positions
  (reads = S).
Projections and the MLP are left out: they cost the same in both.

  python tools/bench_decode.py                       # 8k..64k, GPU when available
  python tools/bench_decode.py --seq-lens 1024,2048 --device cpu --csv out.csv

Prints a markdown table and writes a CSV (atomically). The paper's expected read ratio
at 64k with its config is 65536 / (Nc + n*l' + w) = 65536 / 5631 = 11.6x.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() over iters runs after warmup runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_one(S: int, args, device, dtype) -> dict:
    import torch

    from nsa_dist import NSAConfig
    from nsa_dist.inference import LayerCache, attend_step
    from nsa_dist.inference.counters import dense_reads, expected_reads

    cfg = NSAConfig(cmp_block=args.cmp_block, cmp_stride=args.cmp_stride, sel_block=args.sel_block,
                    num_selected=args.num_selected, window=args.window)
    B, HQ, H, D = args.batch, args.heads, args.kv_heads, args.head_dim
    gen = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)  # noqa: E731

    # NSA caches holding S-1 random tokens; each timed step appends token S-1 and attends.
    cache = LayerCache.empty(cfg, B, S, H, D, D, device, dtype)
    for name in ("k_sel", "v_sel", "k_raw", "v_raw", "k_cmp", "v_cmp") + (("k_win", "v_win") if cfg.window else ()):
        t = getattr(cache, name)
        t.copy_(rnd(*t.shape))
    new = {k: rnd(B, H, D) for k in ("k_sel", "v_sel", "k_win", "v_win", "k_raw", "v_raw")}
    q, gates = rnd(B, HQ, D), torch.sigmoid(rnd(B, HQ, 3))
    start_len = torch.full((B,), S - 1, dtype=torch.long, device=device)

    def nsa_step():
        cache.lengths = start_len
        cache.append(new, None, None)
        return attend_step(q, gates, cache)

    _, _, reads = nsa_step()
    per = reads.per_branch()
    assert (per["cmp"], per["sel"], per["win"]) == tuple(float(x) for x in expected_reads(S, cfg))
    nsa_ms = _time(nsa_step, device, args.warmup, args.iters)

    k_dense, v_dense = rnd(B, H, S, D), rnd(B, H, S, D)
    # The G query heads of a KV head play SDPA's query axis (no mask: all S positions are
    # visible): K/V are read once per KV head, never expanded to HQ heads.
    qd = q.reshape(B, H, HQ // H, D)
    pos = S - 1

    def dense_step():
        k_dense[:, :, pos], v_dense[:, :, pos] = new["k_sel"], new["v_sel"]
        return torch.nn.functional.scaled_dot_product_attention(qd, k_dense, v_dense)

    dense_ms = _time(dense_step, device, args.warmup, args.iters)
    nsa_reads = per["cmp"] + per["sel"] + per["win"]
    return {"seq_len": S, "nsa_ms": round(nsa_ms, 4), "dense_ms": round(dense_ms, 4),
            "speedup": round(dense_ms / nsa_ms, 3), "nsa_reads": int(nsa_reads),
            "reads_cmp": int(per["cmp"]), "reads_sel": int(per["sel"]), "reads_win": int(per["win"]),
            "dense_reads": dense_reads(S), "read_ratio": round(dense_reads(S) / nsa_reads, 2)}


def write_csv(rows: list[dict], path: str) -> None:
    """Write atomically (no half-written CSV); the folder is made if missing."""
    from nsa_dist.fileio import atomic_open

    with atomic_open(path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", default="8192,16384,32768,65536", help="comma-separated cache lengths")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=64, help="query heads (paper: 64)")
    p.add_argument("--kv-heads", type=int, default=4, help="KV heads (paper: 4 groups)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--cmp-block", type=int, default=32)
    p.add_argument("--cmp-stride", type=int, default=16)
    p.add_argument("--sel-block", type=int, default=64)
    p.add_argument("--num-selected", type=int, default=16)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
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
    try:
        seq_lens = [int(s) for s in args.seq_lens.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seq-lens must be comma-separated integers, got {args.seq_lens!r}")
    if not seq_lens or min(seq_lens) < 1:
        raise SystemExit("--seq-lens needs positive lengths")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"# device: {name}, dtype: {str(dtype).replace('torch.', '')}, batch {args.batch}, "
          f"heads {args.heads}/{args.kv_heads}, head_dim {args.head_dim}, "
          f"l={args.cmp_block} d={args.cmp_stride} l'={args.sel_block} n={args.num_selected} "
          f"w={args.window}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with torch.no_grad():
        rows = [bench_one(S, args, device, dtype) for S in seq_lens]
    print(markdown_table(rows))
    write_csv(rows, args.csv)
    print(f"# wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

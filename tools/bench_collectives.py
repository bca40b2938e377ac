"""Bus bandwidth of the collectives the parallel layouts use, nccl-tests style.

    torchrun --standalone --nproc_per_node 4 tools/bench_collectives.py [--mib 256]

busbw = bytes / time x factor, with the whole message's bytes (the gathered / reduced
tensor) and factor 2(n-1)/n for all-reduce, (n-1)/n for all-gather, reduce-scatter and
all-to-all: the per-GPU link traffic, comparable with the link's speed. Rank 0 prints one
``[busbw]`` line per collective. docs/scaling.md compares the layouts' collective time with it.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256, help="message size (MiB, bf16)")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    n, rank = dist.get_world_size(), dist.get_rank()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    numel = args.mib * 2**20 // 2
    numel -= numel % n
    full = torch.randn(numel, device=dev, dtype=torch.bfloat16)
    part = torch.randn(numel // n, device=dev, dtype=torch.bfloat16)
    out = torch.empty_like(full)
    ops = {
        "all_reduce": (lambda: dist.all_reduce(full), 2 * (n - 1) / n),
        "all_gather": (lambda: dist.all_gather_into_tensor(out, part), (n - 1) / n),
        "reduce_scatter": (lambda: dist.reduce_scatter_tensor(part, full), (n - 1) / n),
        "all_to_all": (lambda: dist.all_to_all_single(out, full), (n - 1) / n),
    }
    for name, (fn, factor) in ops.items():
        fn()
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t = time.perf_counter()
        for _ in range(args.iters):
            fn()
        if cuda:
            torch.cuda.synchronize()
        sec = (time.perf_counter() - t) / args.iters
        if rank == 0:
            nbytes = numel * 2
            print(f"[busbw] {name:<15} {n} ranks {args.mib} MiB: {sec * 1e3:7.2f} ms, "
                  f"algbw {nbytes / sec / 1e9:6.1f} GB/s, busbw {nbytes / sec * factor / 1e9:6.1f} GB/s",
                  flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

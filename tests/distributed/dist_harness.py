"""Run a function on N CPU processes (gloo, 127.0.0.1, a free port) and collect results.

Processes are forked where the platform allows: the children then share the parent's
imports (torch, nsa_dist, and torch._dynamo, which the reference's activation checkpointing
imports on first use at ~2 s per process), so a layout test takes about a second instead of
ten. ``start_method="spawn"`` is the portable fallback.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, out_dir: str, kwargs: dict, backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=90))  # a hang fails instead of blocking CI
    try:
        result = fn(rank, world, **kwargs)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(result if result is not None else {}, fh)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def default_start_method() -> str:
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def run_world(fn, world: int, start_method: str = "", dist_backend: str = "gloo", **kwargs) -> list[dict]:
    """Run ``fn(rank, world, **kwargs)`` on ``world`` processes; returns each rank's result
    (a JSON-serialisable dict). A failure in any rank raises here with its traceback."""
    start_method = start_method or default_start_method()
    if start_method == "fork":
        import torch._dynamo  # noqa: F401  (see module docstring)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(fn, world, free_port(), out_dir, kwargs, dist_backend), nprocs=world,
                           join=True, start_method=start_method)
        results = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as fh:
                results.append(json.load(fh))
        return results

"""What the context-parallel plan costs at cp = 1: one NSA layer's forward + backward, plain
and under ``parallelize_attention`` with ``ParallelState(1, 0, cp=1)`` (a one-rank process
group), on the same weights and inputs in one process (issue 29: the overhead must stay
under 3% of the layer).

Usage (CUDA machine, repository root):
    python tools/bench_cp_overhead.py --seq 32768            # plain vs the cp=1 plan
    PYTHONPATH=/path/to/other/checkout python tools/bench_cp_overhead.py --plain-only
(the second times another revision's plain layer, e.g. main's, for the same table row).
Medians of ``triton.testing.do_bench`` (ms) in bf16 on CUDA; wall-clock medians in fp32 on a CPU.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist


def _layer(args, device, dtype):
    from nsa_dist import NSAConfig
    from nsa_dist.modules import NSAAttention

    torch.manual_seed(0)
    layer = NSAAttention(args.hidden, args.heads, args.kv_heads, args.head_dim,
                         config=NSAConfig(phi="mlp"), backend=args.backend)
    return layer.to(device=device, dtype=dtype)


def _time(layer, x, cu, rep_ms: int) -> float:
    """Median ms of one forward + backward (do_bench on CUDA; wall clock elsewhere)."""
    def step():
        x.grad = None
        y, _ = layer(x, cu_seqlens=cu)
        y.backward(torch.ones_like(y))
    if x.is_cuda:
        from triton.testing import do_bench
        return do_bench(step, warmup=3, rep=rep_ms)
    step()
    times, spent = [], 0.0
    while spent < rep_ms / 1e3 or len(times) < 3:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    return statistics.median(times) * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"))
    ap.add_argument("--docs", type=int, default=1, help="packed documents of equal length (1: none)")
    ap.add_argument("--rep-ms", type=int, default=2000, help="do_bench time budget per measurement")
    ap.add_argument("--plain-only", action="store_true", help="time the plain layer only")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layer = _layer(args, device, dtype)
    x = torch.randn(1, args.seq, args.hidden, device=device, dtype=dtype, requires_grad=True)
    cu = None
    if args.docs > 1:
        cu = torch.linspace(0, args.seq, args.docs + 1).round().to(torch.int32)  # host offsets
    plain = _time(layer, x, cu, args.rep_ms)
    print(f"device={torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} S={args.seq} "
          f"hidden={args.hidden} HQ={args.heads} H={args.kv_heads} D={args.head_dim} docs={args.docs}")
    print(f"plain layer fwd+bwd: {plain:.3f} ms")
    if args.plain_only:
        return
    from nsa_dist.parallel import ParallelState, parallelize_attention

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"file://{os.path.join(tmp, 'pg')}", rank=0, world_size=1)
        try:
            planned = parallelize_attention(copy.deepcopy(layer), ParallelState(1, 0, cp=1))
            with torch.no_grad():
                y0, _ = layer(x, cu_seqlens=cu)
                y1, _ = planned(x, cu_seqlens=cu)
            same = torch.equal(y0, y1)
            cp1 = _time(planned, x, cu, args.rep_ms)
        finally:
            dist.destroy_process_group()
    print(f"cp=1 plan fwd+bwd:   {cp1:.3f} ms  (overhead {100 * (cp1 / plain - 1):+.2f}%, "
          f"outputs {'identical' if same else 'DIFFER'})")


if __name__ == "__main__":
    main()

"""Where one attention layer's time goes: NSA vs dense, forward + backward, on a GPU.

    python tools/profile_attention.py --model configs/model/1b.yaml --seq 32768 --heads 32:8,8:2

Each ``HQ:H`` pair is a layer with that many query / KV heads (8:2 is what one GPU of a
TP=4 or Ulysses=4 layout of the 1b model holds). For each, prints the layer's forward +
backward time for NSA and dense (CUDA events, median of --iters) and NSA's top GPU kernels
by total time (torch.profiler), so fixed costs that do not shrink with the head count show.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from nsa_dist.config import ModelConfig  # noqa: E402
from nsa_dist.modules.attention import NSAAttention  # noqa: E402
from nsa_dist.modules.dense import DenseAttention  # noqa: E402


def _time(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="configs/model/1b.yaml")
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--heads", default="32:8,8:2")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args()
    cfg = ModelConfig.from_yaml(args.model)
    dev = torch.device("cuda")
    rows = []
    for pair in args.heads.split(","):
        hq, h = (int(v) for v in pair.split(":"))
        torch.manual_seed(0)
        nsa = NSAAttention(cfg.hidden_size, hq, h, cfg.head_dim, config=cfg.nsa, rope_theta=cfg.rope_theta)
        dense = DenseAttention(cfg.hidden_size, hq, h, cfg.head_dim, rope_theta=cfg.rope_theta)
        x = torch.randn(1, args.seq, cfg.hidden_size, device=dev, dtype=torch.bfloat16, requires_grad=True)
        for name, mod in (("nsa", nsa), ("dense", dense)):
            mod = mod.to(dev, torch.bfloat16)

            def step(mod=mod):
                y, _ = mod(x)
                y.float().pow(2).mean().backward()

            def fwd(mod=mod):
                with torch.no_grad():
                    mod(x)

            rows.append((f"{hq}:{h}", name, _time(fwd, args.iters), _time(step, args.iters)))
            if name == "nsa":
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    step()
                    torch.cuda.synchronize()
                print(f"--- NSA {hq}:{h} S={args.seq}: top GPU kernels (one fwd+bwd) ---")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top,
                                                max_name_column_width=60))
    print(f"{'heads':<6} {'attn':<6} {'fwd ms':>9} {'fwd+bwd ms':>11}")
    for r in rows:
        print(f"{r[0]:<6} {r[1]:<6} {r[2]:9.2f} {r[3]:11.2f}")


if __name__ == "__main__":
    main()

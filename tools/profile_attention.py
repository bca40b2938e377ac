"""Where one attention layer's time goes: NSA vs dense, forward + backward, on a GPU.

    python tools/profile_attention.py --model configs/model/1b.yaml --seq 32768 --heads 32:8,8:2 [--unfused]

Each ``HQ:H`` pair is a layer with that many query / KV heads (8:2 is what one GPU of a
TP=4 or Ulysses=4 layout of the 1b model holds). For each, prints the layer's forward +
backward time for NSA and dense (CUDA events, median of --iters) and NSA's top GPU kernels
by total time (torch.profiler), so fixed costs that do not shrink with the head count show.

    python tools/profile_attention.py --seq 65536 --heads 32:8 --docs 8 --cu-device cpu,cuda

``--docs N`` packs the sequence into N documents (``cu_seqlens``), kept on each device of
``--cu-device``; the table then also gives the GPU syncs of one forward + backward, counted
with torch's sync debug mode (a CUDA ``cu_seqlens`` is read on the host once per op call).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

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


def _syncs(fn) -> int:
    """GPU syncs of one call of ``fn``, from torch's sync debug mode (it names the
    synchronising calls it knows of; torch says it does not know every one)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    # only the per-call notice; the mode's one-time "prototype feature" notice is not a sync
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in seen)


def _offsets(S: int, docs: int) -> list[int]:
    """N documents of equal length, the remainder in the last."""
    return [i * (S // docs) for i in range(docs)] + [S]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="configs/model/1b.yaml")
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--heads", default="32:8,8:2")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--docs", type=int, default=0, help="pack the sequence into this many documents")
    ap.add_argument("--cu-device", default="cpu", help="where cu_seqlens lives, comma-separated: cpu, cuda")
    ap.add_argument("--no-profile", action="store_true", help="timings only")
    ap.add_argument("--unfused", action="store_true",
                    help="separate input projections (ModelConfig.fused_projection=false)")
    args = ap.parse_args()
    if args.docs < 0 or args.docs > args.seq:
        raise SystemExit(f"--docs must be in 0..--seq ({args.seq}), got {args.docs}")
    places = [p for p in args.cu_device.split(",") if p]
    if not places or any(p not in ("cpu", "cuda") for p in places):
        raise SystemExit(f"--cu-device takes cpu and/or cuda, got {args.cu_device!r}")
    if not args.docs:
        places = [None]
    cfg = ModelConfig.from_yaml(args.model)
    dev = torch.device("cuda")
    rows = []
    for pair in args.heads.split(","):
        hq, h = (int(v) for v in pair.split(":"))
        torch.manual_seed(0)
        fused = not args.unfused
        nsa = NSAAttention(cfg.hidden_size, hq, h, cfg.head_dim, config=cfg.nsa, rope_theta=cfg.rope_theta,
                           fused_projection=fused)
        dense = DenseAttention(cfg.hidden_size, hq, h, cfg.head_dim, rope_theta=cfg.rope_theta,
                               fused_projection=fused)
        x = torch.randn(1, args.seq, cfg.hidden_size, device=dev, dtype=torch.bfloat16, requires_grad=True)
        for (name, mod), place in ((m, p) for m in (("nsa", nsa), ("dense", dense)) for p in places):
            mod = mod.to(dev, torch.bfloat16)
            cu = None if place is None else torch.tensor(_offsets(args.seq, args.docs), dtype=torch.int32,
                                                          device=place)

            def step(mod=mod, cu=cu):
                y, _ = mod(x, cu_seqlens=cu)
                y.float().pow(2).mean().backward()

            def fwd(mod=mod, cu=cu):
                with torch.no_grad():
                    mod(x, cu_seqlens=cu)

            label = name if place is None else f"{name}/{args.docs}docs/cu-{place}"
            rows.append((f"{hq}:{h}", label, _time(fwd, args.iters), _time(step, args.iters), _syncs(step)))
            if name == "nsa" and not args.no_profile and place == places[0]:
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    step()
                    torch.cuda.synchronize()
                print(f"--- NSA {hq}:{h} S={args.seq}: top GPU kernels (one fwd+bwd) ---")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top,
                                                max_name_column_width=60))
        print(f"dense {hq}:{h}: causal attention picked per shape: {dense.kernel.chosen}")
    print(f"{'heads':<6} {'attn':<24} {'fwd ms':>9} {'fwd+bwd ms':>11} {'syncs':>6}")
    for r in rows:
        print(f"{r[0]:<6} {r[1]:<24} {r[2]:9.2f} {r[3]:11.2f} {r[4]:>6}")


if __name__ == "__main__":
    main()

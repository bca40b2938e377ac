#!/usr/bin/env python
"""Synthetic needle test of NSA's block selection at long context (default 64k tokens).

One selection block's keys match the last query strongly; at every depth tried, the
reference selection (one tile of the reference's own tiled select on the CPU, the kernels'
select_blocks on CUDA) and the decode path's selection must contain that block.

  python tools/needle.py --seq-len 65536 --depths 0,0.25,0.5,0.75,1
  python tools/needle.py --seq-len 16384 --device cuda

With ``--generate`` the needle goes through the whole model path instead: a one-layer NSA
model built so that only its selection branch can answer (``needle_model``) is prefilled
with the haystack prompt and ``generate()`` produces --new-tokens tokens (decode kernels
and CUDA graphs on CUDA); the needle is found when every token is the answer.

  python tools/needle.py --generate --seq-len 65536 --device cuda --dtype bfloat16

Exit status 1 when any depth is missed. Config defaults are the paper's (l=32, d=16,
l'=64, n=16, w=512).
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=65536)
    p.add_argument("--depths", default="0,0.1,0.25,0.5,0.75,0.9,1", help="comma-separated, in [0, 1]")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--cmp-block", type=int, default=32)
    p.add_argument("--cmp-stride", type=int, default=16)
    p.add_argument("--sel-block", type=int, default=64)
    p.add_argument("--num-selected", type=int, default=16)
    p.add_argument("--strength", type=float, default=4.0, help="needle strength (0: no needle, a control)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda uses the kernels when installed)")
    p.add_argument("--generate", action="store_true", help="through prefill + generate() of a needle model")
    p.add_argument("--new-tokens", type=int, default=4, help="--generate: tokens to generate")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="--generate: model dtype")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"),
                   help="--generate: decode path (auto: kernels + CUDA graphs on CUDA)")
    return p


def _report(depths, run_one, columns: str) -> int:
    """One markdown row per depth from run_one(i, depth) -> (ok, cells); exit status."""
    print("| depth | " + " | ".join(columns.split(",")) + " |")
    print("|---|" + "---|" * len(columns.split(",")))
    failed = 0
    for i, depth in enumerate(depths):
        ok, cells = run_one(i, depth)
        failed += not ok
        print(f"| {depth:g} | " + " | ".join(cells) + " |")
    print(f"# {len(depths) - failed}/{len(depths)} depths found")
    return 1 if failed else 0


def run_generate(args, cfg, depths) -> int:
    import torch

    from nsa_dist.inference.needle import run_generate_needle

    print(f"# needle through generate(): seq_len {args.seq_len}, {args.new_tokens} new tokens, device "
          f"{args.device}, {args.dtype}, backend {args.backend}")

    def one(i, depth):
        r = run_generate_needle(args.seq_len, depth, cfg, args.device, getattr(torch, args.dtype), args.new_tokens,
                                with_needle=args.strength != 0, backend=args.backend, seed=args.seed + i)
        return r.ok, [str(r.block), ",".join(map(str, r.tokens)), "yes" if r.ok else "NO", f"{r.seconds:.2f}"]
    return _report(depths, one, "block,tokens,found,seconds")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from nsa_dist import NSAConfig
    from nsa_dist.inference.needle import run_needle

    cfg = NSAConfig(cmp_block=args.cmp_block, cmp_stride=args.cmp_stride, sel_block=args.sel_block,
                    num_selected=args.num_selected)
    try:
        depths = [float(x) for x in args.depths.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--depths must be comma-separated numbers in [0, 1], got {args.depths!r}")
    if args.seq_len < 1:
        raise SystemExit("--seq-len must be positive")
    if args.generate:
        return run_generate(args, cfg, depths)
    print(f"# needle: seq_len {args.seq_len}, l={cfg.cmp_block} d={cfg.cmp_stride} l'={cfg.sel_block} "
          f"n={cfg.num_selected}, head_dim {args.head_dim}, device {args.device}")

    def one(i, depth):
        r = run_needle(args.seq_len, depth, cfg, args.head_dim, args.seed + i, args.device, args.strength)
        return r.ok, [str(r.block), "picked" if r.picked_reference else "MISSED",
                      "picked" if r.picked_decode else "MISSED", str(r.rank), f"{r.seconds:.2f}"]
    return _report(depths, one, "block,reference,decode,rank,seconds")


if __name__ == "__main__":
    sys.exit(main())

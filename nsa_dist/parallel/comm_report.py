"""Per-layer communication of each parallel layout, from the analytic model in comm_stats.

``python -m nsa_dist.parallel.comm_report [--config model.yaml] [--seq 32768] [--gpus 8]``
prints payload and per-rank wire bytes per decoder layer per training step (forward +
backward) and the time at the bus bandwidths measured on H200 (PARALLEL_NOTES.md).
"""
from __future__ import annotations

from .comm_stats import layer_traffic, summarize, wire_bytes

# Bus bandwidths measured on 4 H200 (NCCL 2.28, 256 MiB messages; PARALLEL_NOTES.md), GB/s.
H200_BUS_GBPS = {"all_gather": 325.0, "reduce_scatter": 296.0, "all_reduce": 340.0, "all_to_all": 302.0}


def main(argv=None) -> None:
    """Print per-layer communication of each layout for a model: ``python -m
    nsa_dist.parallel.comm_report [--config model.yaml] [--seq 32768] [--batch 1]``."""
    import argparse

    from ..config import ModelConfig, NSAConfig
    from .state import check_model_layout

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--config", help="ModelConfig YAML (default: a 1.5B-class NSA model)")
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--selection-comm", default="auto", choices=("auto", "importance", "gather_q"))
    args = ap.parse_args(argv)
    if args.config:
        cfg = ModelConfig.from_yaml(args.config)
    else:
        cfg = ModelConfig(vocab_size=32000, hidden_size=2048, num_layers=24, num_heads=32, num_kv_heads=4,
                          head_dim=64, max_seq_len=args.seq, nsa=NSAConfig(phi="mlp"))
    B, S, g = args.batch, args.seq, args.gpus
    print(f"model: hidden={cfg.hidden_size} HQ={cfg.num_heads} H={cfg.num_kv_heads} Dk={cfg.head_dim} "
          f"Dv={cfg.dv} phi={cfg.nsa.phi}; B={B} S={S}; bf16 activations, fp32 gradients; "
          f"selection_comm={args.selection_comm}")
    print(f"{'layout':<26}{'payload MiB':>12}{'wire MiB/rank':>15}{'ms @H200 bus':>14}   per layer, fwd+bwd")
    H = cfg.num_kv_heads
    # (name, tp, sp, megatron_sp, cp)
    layouts = [(f"TP={g}", g, 1, False, 1), (f"TP={g} + Megatron SP", g, 1, True, 1),
               (f"TP={g // 2}", g // 2, 1, False, 1), (f"Ulysses={g}", 1, g, False, 1),
               (f"Ulysses={H}", 1, H, False, 1), (f"TP=2 x Ulysses={g // 2}", 2, g // 2, False, 1),
               (f"CP={g}", 1, 1, False, g), (f"CP={H}", 1, 1, False, H),
               (f"Ulysses={H} x CP={g // H}", 1, H, False, g // H), (f"TP=2 x CP={g // 2}", 2, 1, False, g // 2)]
    seen = set()
    for name, tp, sp, msp, cp in layouts:
        if (tp, sp, msp, cp) in seen or tp * sp * cp > g or g % (tp * sp * cp):
            continue
        seen.add((tp, sp, msp, cp))
        try:
            check_model_layout(cfg.num_heads, cfg.num_kv_heads, tp, sp)
        except ValueError as err:
            print(f"{name:<26} invalid: {err}")
            continue
        rows = layer_traffic(cfg, B, S, tp, sp, msp, selection_comm=args.selection_comm, cp=cp)
        _print_row(name, rows)


def _print_row(name: str, rows: list[dict]) -> None:
    payload, wire = summarize(rows)
    ms = sum(wire_bytes(r["op"], r["payload_bytes"], r["group"]) / (H200_BUS_GBPS[r["op"]] * 1e9)
             for r in rows) * 1e3
    print(f"{name:<26}{payload / 2**20:>12.1f}{wire / 2**20:>15.1f}{ms:>14.3f}")
    detail = {}
    for r in rows:
        detail[r["component"]] = detail.get(r["component"], 0.0) + wire_bytes(r["op"], r["payload_bytes"], r["group"])
    print("    " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in detail.items()))


if __name__ == "__main__":
    main()

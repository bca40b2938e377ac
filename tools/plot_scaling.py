"""Tokens/s per GPU against context, NSA vs dense, from a throughput CSV (nsa_dist.training.bench).

    python tools/plot_scaling.py docs/data/scaling_h200_2026-11-22.csv docs/scaling_tokens_per_s.png \\
        [--layouts dp,sp4] [--gpus 4] [--title ...]

One line per (attention, layout) over the rows with status ok and the given GPU count.
Needs matplotlib (not a dependency of the package: pip install matplotlib).
"""
from __future__ import annotations

import argparse
import csv
import sys


def load(path: str, layouts: list[str], gpus: int) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(attention, layout) -> [(seq_len, tokens/s per GPU)] sorted by seq_len."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["status"] != "ok" or row["layout"] not in layouts or int(row["gpus"]) != gpus:
                continue
            series.setdefault((row["attention"], row["layout"]), []).append(
                (int(row["seq_len"]), float(row["tokens_per_s_per_gpu"])))
    return {k: sorted(v) for k, v in series.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("png")
    ap.add_argument("--layouts", default="dp,sp4")
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--title", default="1b model, bf16, ZeRO-2, activation checkpointing, 4x H200")
    a = ap.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_scaling: needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    series = load(a.csv, a.layouts.split(","), a.gpus)
    if not series:
        print(f"plot_scaling: no ok rows for layouts {a.layouts} on {a.gpus} GPUs in {a.csv}", file=sys.stderr)
        return 2
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    colors = {lay: f"C{i}" for i, lay in enumerate(sorted({lay for _, lay in series}))}
    for (attn, layout), pts in sorted(series.items(), key=lambda kv: (kv[0][1], kv[0][0] != "nsa")):
        xs, ys = zip(*pts)  # colour: layout; solid: NSA, dashed: dense
        ax.plot([x / 1024 for x in xs], ys, marker="o", color=colors[layout],
                linestyle="-" if attn == "nsa" else "--", label=f"{attn.upper()} {layout}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (k tokens)")
    ax.set_ylabel("tokens/s per GPU")
    ax.set_title(a.title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from nsa_dist.fileio import AtomicFile

    with AtomicFile(a.png) as f:  # the temporary name keeps the .png that picks the format
        fig.savefig(f.tmp)
    print(f"wrote {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

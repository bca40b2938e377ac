"""Exit 0 where a ``bench_kernels.py --ab`` CSV shows the changed setting's forward+backward
median at least --min-gain faster than the defaults' at its first shape (else 1); prints both.
With --pick LABEL=CSV ..., prints the label whose CSV gained most (at least --min-gain; nothing
if none did). For running a model A/B only after a kernel gain (tools/gpu_steps.sh steps chain them).

    python tools/ab_gain.py kernel_ab_TAG.csv --min-gain 0.02
    python tools/ab_gain.py --pick split_bytes=2147483648=A.csv sel_l2_hints=True=B.csv
"""
from __future__ import annotations

import argparse
import csv
import statistics


def medians(path: str) -> tuple[str, float, float]:
    """(first shape, changed ms, default ms): medians of fwd + bwd over the rounds."""
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise SystemExit(f"{path}: no rows")
    shape = rows[0]["shape"]

    def total(label):
        vals = [float(r["nsa_fwd_ms"]) + float(r["nsa_bwd_ms"]) for r in rows
                if r["shape"] == shape and r["ab_label"] == label and r.get("nsa_bwd_ms")]
        if not vals:
            raise SystemExit(f"{path}: no timed '{label}' row at {shape}")
        return statistics.median(vals)
    return shape, total("changed"), total("default")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="?")
    ap.add_argument("--min-gain", type=float, default=0.02, help="fraction of the default's time")
    ap.add_argument("--pick", nargs="+", default=None, metavar="LABEL=CSV",
                    help="print the label of the CSV that gained most (the last '=' splits label and path)")
    a = ap.parse_args(argv)
    if a.pick:
        return pick(a.pick, a.min_gain)
    if not a.csv:
        raise SystemExit("ab_gain.py: give a CSV or --pick LABEL=CSV ...")
    shape, changed, default = medians(a.csv)
    print(f"[ab_gain] {shape}: changed {changed:.2f} ms, defaults {default:.2f} ms, {default / changed:.3f}x")
    return 0 if changed <= (1 - a.min_gain) * default else 1


def pick(pairs: list, min_gain: float) -> int:
    """Print the label of the pair whose CSV gained most (missing files skipped); exit 0 if any
    gained at least min_gain, else print nothing and exit 1."""
    import os
    import sys

    best = None
    for pair in pairs:
        label, _, path = pair.rpartition("=")
        if not label or not os.path.exists(path):
            continue
        shape, changed, default = medians(path)
        gain = 1 - changed / default
        print(f"[ab_gain] {label} at {shape}: {default / changed:.3f}x", file=sys.stderr)
        if gain >= min_gain and (best is None or gain > best[0]):
            best = (gain, label)
    if best is None:
        return 1
    print(best[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

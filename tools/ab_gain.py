"""Exit 0 where a ``bench_kernels.py --ab`` CSV shows the changed setting's forward+backward
median at least --min-gain faster than the defaults' at its first shape (else 1); prints both.
For running a model A/B only after a kernel gain (tools/gpu_steps.sh, step m32ab_if).

    python tools/ab_gain.py kernel_ab_TAG.csv --min-gain 0.02
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics


def medians(path: str) -> tuple[str, float, float]:
    """(first shape, changed ms, default ms): medians of fwd + bwd over the rounds."""
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no such file (did the --ab run write it? its log says why not)")
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
    ap.add_argument("csv", help="kernel_ab_<tag>.csv of tools/bench_kernels.py --ab")
    ap.add_argument("--min-gain", type=float, default=0.02, help="fraction of the default's time")
    a = ap.parse_args(argv)
    shape, changed, default = medians(a.csv)
    print(f"[ab_gain] {shape}: changed {changed:.2f} ms, defaults {default:.2f} ms, {default / changed:.3f}x")
    return 0 if changed <= (1 - a.min_gain) * default else 1


if __name__ == "__main__":
    raise SystemExit(main())

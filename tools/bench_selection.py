"""Time the GPU block selection on its own (issue 5), optionally against another revision's.

Usage (CUDA machine, repository root):
    git archive aa16a09 kernels | tar -x -C /tmp/old        # the other revision's kernels/
    python tools/bench_selection.py --against /tmp/old/kernels --sweep
For each shape of tools/bench_kernels.py and each size: the compressed log-sum-exp pass, this
tree's ``select_from_lse`` and (with --against) the other one's, on the same inputs in one
process, with the fraction of (position, KV head) rows where the two choices differ (fp32
near-ties). --sweep also times a grid of the selection's launch settings at the largest size.
Medians of triton.testing.do_bench; a table is printed last.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import inspect
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402

# LaunchConfig settings, every combination; the sort-only merge and spans > 1 lost in every
# earlier sweep (docs/kernel_notes.md). The chunks of whole blocks (select_aligned, the
# default where (l, d, l') allow it) with their own rows per program and compressed tokens
# per product; --sweep-grid general: the earlier grid
GRIDS = {
    "aligned": {"select_rows_aligned": (64, 128, 256), "select_keys": (32, 64, 128), "select": ((4, 2), (8, 2), (4, 3))},
    "general": {"select_aligned": (True, False), "select_rows": (64, 128), "select": ((4, 2), (8, 2), (4, 3))},
}


def _load_other(path: str):
    """The other revision's kernels/ folder as package ``nsa_kernels_other`` (only its
    modules: older revisions' ``__init__.py`` is not run); its select_from_lse."""
    spec = importlib.machinery.ModuleSpec("nsa_kernels_other", None, is_package=True)
    spec.submodule_search_locations = [os.path.abspath(path)]
    sys.modules["nsa_kernels_other"] = importlib.util.module_from_spec(spec)
    return importlib.import_module("nsa_kernels_other.selection").select_from_lse


def shape_inputs(name: str, S: int, dtype: torch.dtype):
    """bench_kernels' shape ``name`` at S tokens: (config, its inputs, packed q [S, HQ, Dk],
    packed compressed keys, the call's geometry, the base-2 softmax scale)."""
    from nsa_dist.kernels.nsa import LOG2E, make_geometry, pack

    sh = bk.SHAPES[name]
    cfg = sh.config()
    x = bk.make_inputs(cfg, S, sh.HQ, sh.H, sh.DK, dtype, shared_kv=sh.shared, dv=sh.DV)
    geo = make_geometry(x["q"], x["k_cmp"], x["v_sel"], cfg, None)
    return cfg, x, pack(x["q"]), pack(x["k_cmp"]), geo, sh.DK ** -0.5 * LOG2E


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="a_paper,b_fla,c_small_g")
    ap.add_argument("--sizes", default="32768,65536", help="tokens, e.g. 32k,64k")
    ap.add_argument("--against", help="a kernels/ folder of another revision")
    ap.add_argument("--sweep", action="store_true", help="launch-setting grid at the largest size")
    ap.add_argument("--sweep-grid", default="aligned", choices=sorted(GRIDS), help="which grid --sweep times")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_selection.py needs a CUDA device")
    import triton

    from nsa_dist.kernels import selection
    from nsa_dist.kernels.nsa import _range_forward, make_geometry

    other = _load_other(a.against) if a.against else None
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
          f"bitonic merge {selection.HAS_BITONIC_MERGE} "
          f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    bench = lambda f: triton.testing.do_bench(f, warmup=10, rep=60, return_mode="median")  # noqa: E731
    sizes = bk.parse_sizes(a.sizes)
    rows = []
    for name in a.shapes.split(","):
        for S in sizes:
            cfg, x, q, kc, geo, sc = shape_inputs(name, S, torch.bfloat16)
            with torch.no_grad():
                lse = _range_forward(0, q, kc, kc, geo, cfg, sc, lse_only=True)[1]
                mine = selection.select_from_lse(q, kc, lse, geo, cfg, sc)
                row = dict(shape=name, S=S, lse_ms=bench(lambda: _range_forward(0, q, kc, kc, geo, cfg, sc,
                                                                                lse_only=True)),
                           new_ms=bench(lambda: selection.select_from_lse(q, kc, lse, geo, cfg, sc)))
                if other is not None:
                    # older revisions took the document layout where this one takes the geometry
                    arg = geo.layout if "layout" in inspect.signature(other).parameters else geo
                    theirs = other(q, kc, lse, arg, cfg, sc)
                    row["other_ms"] = bench(lambda: other(q, kc, lse, arg, cfg, sc))
                    row["rows_differing"] = float((theirs != mine).any(-1).float().mean())
                if a.sweep and S == max(sizes):
                    best = (row["new_ms"], "defaults")
                    grid = GRIDS[a.sweep_grid]
                    for vals in itertools.product(*grid.values()):
                        g2 = make_geometry(x["q"], x["k_cmp"], x["v_sel"], cfg, None)
                        g2.launch = bk.launch_config(dict(zip(grid, vals)))
                        tag = " ".join(f"{k}={v}" for k, v in zip(grid, vals))
                        try:
                            f = lambda: selection.select_from_lse(q, kc, lse, g2, cfg, sc)  # noqa: E731
                            same = torch.equal(f(), mine)
                            t = bench(f)
                        except Exception as err:  # noqa: BLE001 - a setting that does not fit
                            print(f"[sweep] {name} S={S} {tag}: failed {type(err).__name__}", flush=True)
                            continue
                        print(f"[sweep] {name} S={S} {tag}: {t:.2f} ms (same choice: {same})", flush=True)
                        best = min(best, (t, tag))
                    row["best"] = f"{best[0]:.2f} ms {best[1]}"
            rows.append(row)
            print(f"[select] {row}", flush=True)
            del x, q, kc, lse
            torch.cuda.empty_cache()
    cols = ["shape", "S", "lse_ms", "other_ms", "new_ms", "rows_differing", "best"]
    print(" | ".join(cols) + " | other/new")
    for r in rows:
        cells = [(f"{r[c]:.2f}" if c.endswith("ms") else f"{r[c]:.1e}") if isinstance(r.get(c), float)
                 else str(r.get(c, "")) for c in cols]
        ratio = f"{r['other_ms'] / r['new_ms']:.2f}x" if "other_ms" in r else ""
        print(" | ".join(cells) + f" | {ratio}")


if __name__ == "__main__":
    main()

"""Registers, spills and shared memory of the peer's compressed-branch forward as Triton builds
it for a GPU, on any machine: the peer's side of docs/kernel_notes.md, "The compressed forward's
tile against the peer's" (ours: tools/kernel_spills.py).

    python tools/peer_kernel_build.py [--peer .peer] [--tile 128:64:4:2] [--compile-triton FOLDER]

The peer (mdy666/Scalable-Flash-Native-Sparse-Attention, never vendored) is read from
``--peer``/flash_nsa/ops/compress_attn.py, as tools/gpu_steps.sh carries it; its package
``__init__`` needs packages the build does not, so only that module is loaded. The launch is
specialised as its launcher would specialise a bf16 call at D = 128 (addresses and row strides
divisible by 16, unit strides constant), then built by ``kernel_spills.compile_usage``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

KERNEL = "_cmp_fwd_kernel"
CONSTS = dict(CP=False, D1=128, D2=0, VD=128)


def load_peer(peer: str):
    """The peer's compress_attn module, under a stub package (its ``utils`` imports pkg_resources)."""
    ops = os.path.join(os.path.abspath(peer), "flash_nsa", "ops")
    if not os.path.isfile(os.path.join(ops, "compress_attn.py")):
        raise SystemExit(f"--peer: no flash_nsa/ops/compress_attn.py under {peer} (copy the peer's flash_nsa/ there)")
    pkg = types.ModuleType("peer_nsa")
    pkg.__path__ = []
    sub = types.ModuleType("peer_nsa.ops")
    sub.__path__ = [ops]
    utils = types.ModuleType("peer_nsa.utils")
    utils.NSAHelper, utils.use_tma = object, (lambda *a, **k: True)
    sys.modules.update({"peer_nsa": pkg, "peer_nsa.ops": sub, "peer_nsa.utils": utils})
    return importlib.import_module("peer_nsa.ops.compress_attn")


def launch_record(fn, rows: int, keys: int, warps: int, stages: int) -> dict:
    """A launch record as kernel_spills.capture writes one: types and specialisation of every
    runtime argument, the constexprs with num_warps / num_stages."""
    consts = dict(CONSTS, BLOCK_N=rows, BLOCK_M=keys)  # the peer's BLOCK_N is its query rows
    names = [n for n in fn.arg_names if n not in consts]
    kinds, spec = [], []
    for n in names:
        if n in ("Q", "K", "V", "O"):
            kinds.append("*bf16")
        elif n == "LSE":
            kinds.append("*fp32")
        elif n.endswith("SEQLENS") or n in ("CP_BATCH_IDX", "CP_OFFSET"):
            kinds.append("*i32")
        elif n == "sm_scale":
            kinds.append("fp32")
        else:
            kinds.append("i32")
        unit = n.endswith("stride_d")
        spec.append("1" if unit else "D" if kinds[-1].startswith("*") or "stride" in n else "")
    return dict(module=fn.__module__, kernel=KERNEL, types=kinds, spec=spec,
                constexprs=dict(consts, num_warps=warps, num_stages=stages))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", default=".peer", help="folder holding the peer's flash_nsa/")
    ap.add_argument("--tile", action="append", default=None,
                    help="rows:keys:warps:stages (repeatable; default the peer's own at D <= 128, 128:64:4:2)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability, 90 = Hopper")
    ap.add_argument("--compile-triton", default="", help="folder holding another Triton (pip install --target)")
    a = ap.parse_args(argv)
    if a.compile_triton:  # before anything imports triton
        if not os.path.isdir(os.path.join(a.compile_triton, "triton")):
            raise SystemExit(f"--compile-triton: no triton package in {a.compile_triton}")
        sys.path.insert(0, a.compile_triton)
    tiles = []
    for t in a.tile or ["128:64:4:2"]:
        try:
            tiles.append(tuple(int(v) for v in t.split(":")))
        except ValueError:
            tiles.append(())
        if len(tiles[-1]) != 4:
            raise SystemExit(f"--tile: rows:keys:warps:stages, four ints, got {t!r}")
    fn = getattr(load_peer(a.peer), KERNEL)
    from kernel_spills import compile_usage

    import triton
    print(f"peer {KERNEL}, bf16, D = 128, sm_{a.arch}a, Triton {triton.__version__}; spill bytes are static (code)")
    for rows, keys, warps, stages in tiles:
        u = compile_usage(launch_record(fn, rows, keys, warps, stages), a.arch)
        print(f"  {rows} rows x {keys} keys, warps {warps} stages {stages}: {u['regs']} registers, "
              f"spills {u['spill_stores']} / {u['spill_loads']} B, shared {u['smem']} B")


if __name__ == "__main__":
    main()

"""GPU correctness check and benchmark of the Triton NSA kernels (issues 5, 25).

Usage (on a CUDA machine, from the repository root):
    python tools/bench_kernels.py --check --bench --out results/
--check: bf16 kernels against the fp32 PyTorch reference (relative RMS error of the output
and every gradient; selection agreement), several group sizes, packed sequences.
--bench: medians, forward and forward+backward, at the shapes (--shapes: (a) paper, (b) FLA's,
(c) small groups, (d) the seeds' default Dk = 192 / Dv = 128) and sizes (--sizes), all in one
process, of: ours (``layer_call``, the model layer's one call, ops.nsa_attention(...,
return_indices=True), selection inside); dense causal attention through SDPA's cuDNN backend,
its flash backend and flash-attn (``dense_best``: the faster per direction, which the speed-ups
are against); FLA's parallel_nsa at (b) when fla-core imports; Scalable-Flash-Native-Sparse-
Attention's HFNSACore (the "peer", package ``flash_nsa`` on PYTHONPATH) against ours with the
same branches (one shared K/V, mean compression inside the timed call; the window only where
the peer can run it: it needs flash-attn). tools/kernel_baselines.py builds the comparisons
(--baselines chooses them); one that cannot run leaves a note in the row, never a crash.
Writes kernel_bench<tag>.csv after every row and prints a table.
--profile: per-kernel CUDA time of one forward and of one forward+backward.
--profile-peer: the same for the peer and for ours with the peer's branches (where the peer wins).
--ncu: one forward+backward (after two for warm-up) between cudaProfilerStart / Stop, for
``ncu --profile-from-start off`` (hardware counters of each kernel of the call).
--gaps: GPU idle time inside one forward and one forward+backward (no kernel running on any
stream), from a torch.profiler trace, with the longest gaps and the kernels around them.
--sweep: one launch setting changed at a time (selection given), --rounds times interleaved;
kernel_sweep<tag>.csv.
--ab NAME=VALUE[,...]: the whole function (as --bench, ours only) with these LaunchConfig
settings (kernels/launch.py, e.g. sel_dkdv_seg_rows=1024,range_fwd=(8,3)) and with the
defaults, A B then B A for --rounds rounds in one process: A/B of a default, free of the
spread between processes; kernel_ab<tag>.csv.
--profile, --profile-peer, --ncu, --gaps, --sweep and --ab run at the largest of --sizes.
"""
from __future__ import annotations

import argparse
import ast
import csv
import os
import statistics
import sys
import time
from typing import NamedTuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # nsa_dist from this checkout when it is not installed
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # kernel_baselines beside this file


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def device() -> str:
    """Where the bench puts its tensors: CUDA, or the CPU under TRITON_INTERPRET=1 (tests)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(cfg, S, HQ, H, D, dtype, seed=0, cu_seqlens=None, shared_kv=False, dv=None):
    """Random NSA inputs (ORDER), keys of head dim D, values of ``dv`` (default D)."""
    from nsa_dist.ops import compress

    dv = dv or D
    dev = device()
    g = torch.Generator(device=dev).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=dev, dtype=torch.float32)
    q = r(1, S, HQ, D)
    k, v = r(1, S, H, D), r(1, S, H, dv)
    if shared_kv:
        ks, vs, kw, vw, kr, vr = k, v, k, v, k, v
    else:
        ks, vs, kw, vw, kr, vr = r(1, S, H, D), r(1, S, H, dv), r(1, S, H, D), r(1, S, H, dv), k, v
    x = dict(q=q, k_cmp=compress(kr, cfg, cu_seqlens=cu_seqlens), v_cmp=compress(vr, cfg, cu_seqlens=cu_seqlens),
             k_sel=ks, v_sel=vs, k_win=kw, v_win=vw,
             gates=torch.rand(1, S, HQ, 3, generator=g, device=dev))
    return {n: t.to(dtype).contiguous() for n, t in x.items()}


ORDER = ("q", "k_cmp", "v_cmp", "k_sel", "v_sel", "k_win", "v_win", "gates")


def check_case(name, cfg, S, HQ, H, D, cu_seqlens=None, rows=None):
    """bf16 kernel vs fp32 reference on the same (bf16-rounded) inputs; selection agreement."""
    from nsa_dist.ops import nsa_attention, select_blocks

    x = make_inputs(cfg, S, HQ, H, D, torch.bfloat16, cu_seqlens=cu_seqlens)
    x32 = {n: t.float().requires_grad_(True) for n, t in x.items()}
    xb = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    idx_ref = select_blocks(x32["q"].detach(), x32["k_cmp"].detach(), cfg, cu_seqlens=cu_seqlens,
                            backend="reference")
    idx_tri = select_blocks(xb["q"].detach().float(), xb["k_cmp"].detach().float(), cfg,
                            cu_seqlens=cu_seqlens, backend="triton")
    idx_bf = select_blocks(xb["q"].detach(), xb["k_cmp"].detach(), cfg, cu_seqlens=cu_seqlens,
                           backend="triton")
    sel_mis = float((idx_ref != idx_tri).any(-1).float().mean())
    sel_mis_bf = float((idx_ref != idx_bf).any(-1).float().mean())
    o_ref = nsa_attention(*(x32[n] for n in ORDER), cfg, cu_seqlens=cu_seqlens, backend="reference",
                          block_indices=idx_ref)
    o = nsa_attention(*(xb[n] for n in ORDER), cfg, cu_seqlens=cu_seqlens, backend="triton",
                      block_indices=idx_ref)
    do = torch.randn_like(o_ref)
    o_ref.backward(do)
    o.backward(do.to(o.dtype))
    errs = {"o": rel_rms(o, o_ref)}
    for n in ORDER:
        ga, gb = xb[n].grad, x32[n].grad
        if ga is None or gb is None:  # a branch that is off (w = 0) has no gradient in one path
            ga = torch.zeros_like(x32[n]) if ga is None else ga
            gb = torch.zeros_like(x32[n]) if gb is None else gb
        errs["d" + n] = rel_rms(ga, gb) if gb.abs().max() > 0 else float(ga.abs().max())
    worst = max(errs.values())
    rows.append(dict(case=name, S=S, HQ=HQ, H=H, D=D, worst_rel_rms=f"{worst:.2e}",
                     sel_mismatch_fp32=f"{sel_mis:.2e}", sel_mismatch_bf16=f"{sel_mis_bf:.2e}",
                     detail=" ".join(f"{k}={v:.1e}" for k, v in errs.items())))
    print(f"[check] {name}: worst rel RMS {worst:.2e} (bar 5e-3) sel mismatch fp32 {sel_mis:.2e} "
          f"bf16 {sel_mis_bf:.2e} | {rows[-1]['detail']}", flush=True)
    return worst <= 5e-3


def run_checks(out_dir):
    from nsa_dist import NSAConfig

    cfg = NSAConfig()
    rows, ok = [], True
    for G in (1, 2, 4, 8, 16):
        ok &= check_case(f"paper-G{G}", cfg, 4096, 2 * G, 2, 128, rows=rows)
    ok &= check_case("G3-D64", cfg, 2048, 6, 2, 64, rows=rows)
    fla_cfg = NSAConfig(cmp_block=64, cmp_stride=64, sel_block=64, num_selected=16, window=0)
    ok &= check_case("fla-cfg-G16", fla_cfg, 4096, 16, 1, 128, rows=rows)
    cu = torch.tensor([0, 1000, 1003, 3000, 4096], dtype=torch.int32, device="cuda")
    ok &= check_case("packed-G4", cfg, 4096, 8, 2, 128, cu_seqlens=cu, rows=rows)
    ok &= check_case("long-G16", cfg, 65536, 16, 1, 128, rows=rows)
    ok &= check_case("long-G4", cfg, 65536, 4, 1, 128, rows=rows)  # the block-major selected dq at 64k
    _write_csv(os.path.join(out_dir, "kernel_check.csv"), rows)
    print(f"[check] all within 5e-3: {ok}")
    return ok


def _write_csv(path, rows):
    """All rows, every column any row has (in first-seen order), written atomically: the bench
    rewrites its file after each row, so a run cut short keeps what it measured."""
    if not rows:
        return
    from nsa_dist.fileio import atomic_open

    fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


SAMPLES = 10  # timed calls behind each median, at least (--samples)
LONG_MS = 20.0  # calls at least this long are timed one by one with CUDA events


def _read_csv(path) -> list:
    """The rows of a CSV written by ``_write_csv`` (values as text); none when it is missing."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _bench(fn, grad_inputs=None):
    """Median milliseconds of ``fn()`` (``grad_inputs``' .grad cleared before each call).

    Calls under LONG_MS: triton.testing.do_bench, which counts its warm-up and repeats in ms
    divided by its own estimate (5 calls, which come out a little slower): at a fixed 50 / 200
    ms a 140 ms call was timed once, so both are sized from one timed call, with room for that
    estimate (>= SAMPLES samples after >= 3 warm-up calls). Longer calls (dense attention at
    64k: 100-750 ms) are timed one by one after the two first calls: their L2 state does not
    matter and do_bench's estimate would double the time spent."""
    import triton

    def step():
        if grad_inputs is not None:
            for t in grad_inputs:
                t.grad = None
        fn()
    step()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    step()
    b.record()
    torch.cuda.synchronize()
    est = a.elapsed_time(b)
    if est >= LONG_MS:
        times = []
        for _ in range(SAMPLES):
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)
    return triton.testing.do_bench(step, warmup=max(50.0, 4 * est), rep=max(200.0, (SAMPLES + 2) * est),
                                   return_mode="median")


class Shape(NamedTuple):
    """A benchmark shape: heads, head dims and the NSA hyper-parameters (l, d, l', n, w);
    ``shared``: one K/V for every branch, compressed inside the timed call (as FLA)."""
    HQ: int
    H: int
    DK: int
    DV: int
    l: int
    d: int
    ls: int
    n: int
    w: int
    shared: bool

    def config(self, window=None):
        from nsa_dist import NSAConfig

        return NSAConfig(cmp_block=self.l, cmp_stride=self.d, sel_block=self.ls, num_selected=self.n,
                         window=self.w if window is None else window)


SHAPES = {
    "a_paper": Shape(64, 4, 128, 128, 32, 16, 64, 16, 512, False),
    "b_fla": Shape(64, 4, 128, 128, 64, 64, 64, 16, 0, True),
    "c_small_g": Shape(32, 8, 128, 128, 32, 16, 64, 16, 512, False),  # G = 4: the 1b model's 32:8
    "d_seeds": Shape(64, 16, 192, 128, 32, 16, 64, 16, 512, False),  # the seeds' default heads
    # group-size sweep of the selected kernels (not in the default table)
    "g1": Shape(8, 8, 128, 128, 32, 16, 64, 16, 512, False),
    "g2": Shape(16, 8, 128, 128, 32, 16, 64, 16, 512, False),
    "g8": Shape(64, 8, 128, 128, 32, 16, 64, 16, 512, False),
    # configs/model/paper.yaml's heads: Dk = 192 at G = 16 (position-major selected kernels)
    "e_paper_yaml": Shape(64, 4, 192, 128, 32, 16, 64, 16, 512, False),
}

# launch settings the sweep tries, one at a time (LaunchConfig fields, or a dict of them)
SWEEP = {
    "sel_algo": ["block", "query"],
    "sel_dq_algo": ["block", "query"],
    # the selected dq's layout and slot dtype together (a dict sets several launch keys)
    "sel_dq_layout": [{"sel_dq_algo": "query"}, {"sel_dq_algo": "block", "sel_dq_partial": "fp32"},
                      {"sel_dq_algo": "block", "sel_dq_partial": "fp16s"}],
    "sel_dq_split": [(4, 3), (8, 2)],
    "sel_dq_combine": [(8, 1)],
    # the selected dq from the dK/dV kernel (one gather of q / dO): its warps, stages and rows
    "sel_dq_fused": [{"sel_dq_algo": "fused"}, {"sel_dq_algo": "fused", "sel_dkdv_dq": (4, 2)},
                     {"sel_dq_algo": "fused", "sel_dkdv_dq": (8, 3)},
                     {"sel_dq_algo": "fused", "sel_dkdv_dq_rows": 32},
                     {"sel_dq_algo": "fused", "split_bytes": 1 << 32}],
    # L2 eviction hints (keep gathered q / dO, stream the slots), with smaller chunks of positions
    "sel_l2_hints": [True, {"sel_l2_hints": True, "split_bytes": 1 << 28},
                     {"sel_l2_hints": True, "split_bytes": 1 << 29, "sel_dq_algo": "fused"}],
    # segment lengths: of lists the block-major forward / dq walk too (G < 16), and of a list
    # the selected dK/dV walks alone (G >= 16), with two of its launch variants
    "sel_seg_rows": [256, 2048, 4096, 8192, 16384],
    "sel_dkdv_seg_rows": [1024, 2048, 4096, 16384, {"sel_dkdv_seg_rows": 8192, "sel_dkdv": (8, 2)},
                          {"sel_dkdv_seg_rows": 8192, "sel_dkdv_rows": 128, "sel_dkdv": (8, 2)}],
    "split_bytes": [1 << 28, 1 << 32],
    "sel_split": [(4, 3), (8, 2)],
    "sel_combine": [(8, 1)],
    "sel_dkdv": [(4, 2), (8, 2)],
    # the selected dK/dV's registers: its (c) build at (4, 3), 64 rows spilled inside the step loop
    # (Nsight Compute, tenth session: 47M local-memory requests in 6.8 ms at 32k); more warps
    # halve the dK / dV accumulators a thread holds (they lost 10-19% there); 32 rows, now the
    # default, gained 2%
    "sel_dkdv_regs": [{"sel_dkdv": (8, 2)}, {"sel_dkdv": (8, 3)}, {"sel_dkdv_rows": 64},
                      {"sel_dkdv": (4, 4)}, {"sel_dkdv_rows": 64, "sel_dkdv": (8, 3)}],
    "sel_rows": [8, 32],
    "sel_dq": [(4, 2), (8, 2), (8, 3)],
    "dkdv_keys": [32, 128],
    "range_dkdv": [(8, 2), (4, 3)],
    "range_fwd": [(4, 2), (8, 3)],
    "range_dq": [(4, 3), (8, 2)],
    "sel_fwd": [(4, 2), (8, 3)],
    "dkdv_qchunk": [2048, 8192, 1 << 30],
    # shorter query chunks for the compressed dK/dV where its grid is narrow (short sequences)
    "dkdv_programs": [512, 1024, {"dkdv_programs": 512, "first_min_chunk": 128}],
    "first_programs": [128, 2048],
    # rows / keys per step of one kernel (the range forward and dq; each block-major kernel)
    "range_fwd_rows": [32, 128, {"range_fwd_rows": 128, "range_fwd": (8, 3)}],
    "range_fwd_keys": [16, 64, 128, {"range_fwd_keys": 128, "range_fwd": (8, 3)}],
    # the compressed branch's forward alone (long key ranges: larger tiles than the window's)
    "range_cmp_fwd_keys": [32, 128, {"range_cmp_fwd_keys": 128, "range_cmp_fwd_rows": 128, "range_cmp_fwd": (8, 3)},
                           {"range_cmp_fwd_keys": 64, "range_cmp_fwd_rows": 128, "range_cmp_fwd": (8, 2)}],
    "range_cmp_fwd_rows": [128, {"range_cmp_fwd_rows": 128, "range_cmp_fwd": (8, 2)}, {"range_cmp_fwd": (4, 2)}],
    "range_dq_rows": [32, 128, {"range_dq_rows": 128, "range_dq": (8, 2)}],
    "range_dq_keys": [32, 128],
    "sel_split_rows": [32, 128, {"sel_split_rows": 128, "sel_split": (8, 2)}],
    "sel_dq_split_rows": [32, 128, {"sel_dq_split_rows": 128, "sel_dq_split": (8, 2)}],
    "sel_dkdv_rows": [16, 64, {"sel_dkdv_rows": 128, "sel_dkdv": (8, 2)}],
    # more warps where the fp32 accumulators are large (LaunchConfig.acc_regs, 128 by default)
    "acc_regs": [{"acc_regs": None}, 64],  # (a bare None is the sweep's own defaults row)
    # a register cap on the block-major split kernels: three programs an SM at 168 (with spills)
    "sel_split_regs": [168, 128, {"sel_split_regs": 168, "sel_dq_split_regs": 168}],
    "sel_dq_split_regs": [168, 128],
    # the seeds' shape (Dk = 192 as 3 x 64; 128 + 64 or padded to 256; G = 4). Triton 3.6's sm_90a
    # build of the default tiles spills registers in every backward kernel there
    # (docs/kernel_notes.md, "The backward at Dk = 192"): the head dim's pieces, more warps, fewer
    # rows or keys a step; the forward's spills; the chunk bound (1 GiB, the bound before the
    # fused dq's 2 GiB default; 4 GiB)
    "dk192": [{"head_dim_pieces": "one"}, {"head_dim_pieces": "two"}, {"acc_regs": None}, {"acc_regs": 64},
              {"sel_dq_algo": "block"}, {"split_bytes": 1 << 30}, {"range_dq_rows": 32, "range_dq_keys": 32}, {"dkdv_keys": 32},
              {"sel_dq_split_rows": 32}, {"dkdv_rows": 32, "sel_dkdv_rows": 32},
              {"range_dq_rows": 32, "range_dq_keys": 32, "range_dq": (8, 2), "sel_dkdv_rows": 32,
               "sel_dq_split_rows": 32},
              {"range_fwd": (8, 3), "sel_split": (8, 2)}, {"split_bytes": 1 << 32},
              {"acc_regs": 64, "split_bytes": 1 << 32}, {"sel_dkdv": (8, 2)},
              {"dkdv_keys": 32, "range_dkdv": (8, 2)}],
}
# (the selection's own launch grid: tools/bench_selection.py --sweep)


def sweep_settings(key, val) -> dict:
    """The LaunchConfig settings of one SWEEP option (``val`` None: the defaults)."""
    return {} if val is None else dict(val) if isinstance(val, dict) else {key: val}


def layer_call(x: dict, cfg, cu_seqlens=None):
    """The model's attention layer's call: one op that selects (from the compressed branch's
    forward) and attends, returning (o, indices). --bench, --profile and --gaps time this;
    tests/ops/test_fused_call.py fails if the layer's call differs from it."""
    from nsa_dist import ops

    return ops.nsa_attention(*(x[k] for k in ORDER), cfg, cu_seqlens=cu_seqlens, return_indices=True)


BASELINES = ("cudnn", "flash", "flash_attn", "fla", "peer")  # --baselines: what --bench compares with


def ours_timed(x: dict, do, cfg, shared: bool):
    """Our NSA as the bench times it (a ``kernel_baselines.Timed``). shared: one K/V (x's k_sel,
    v_sel) for every branch, compressed (mean pooling) inside the timed call, as FLA and the
    peer; else x's own per-branch inputs, compressed already, as the model layer passes them."""
    from kernel_baselines import Timed

    from nsa_dist.ops import compress

    if shared:
        qq, kk, vv, gg = (x[n].detach().requires_grad_(True) for n in ("q", "k_sel", "v_sel", "gates"))

        def fwd():
            kc, vc = compress(kk, cfg), compress(vv, cfg)
            return layer_call(dict(q=qq, k_cmp=kc, v_cmp=vc, k_sel=kk, v_sel=vv, k_win=kk, v_win=vv, gates=gg),
                              cfg)[0]
        grads = [qq, kk, vv, gg]
    else:
        leaves = {k: v.detach().requires_grad_(True) for k, v in x.items()}

        def fwd():
            return layer_call(leaves, cfg)[0]
        grads = list(leaves.values())
    return Timed(fwd, lambda: fwd().backward(do), grads)


def _measure(build) -> tuple:
    """(forward ms, forward + backward ms, note) of ``build()``'s Timed; its tensors are freed
    on return."""
    t = build()
    with torch.no_grad():
        fwd = _bench(t.fwd)
    return fwd, _bench(t.step, t.grads), t.note


def _time_into(row: dict, notes: list, prefix: str, build) -> bool:
    """Time ``build()``'s Timed into row[prefix_fwd_ms / _bwd_ms / _fwdbwd_ms] (bwd = fwdbwd - fwd);
    what cannot run (kernel_baselines.Unavailable, out of memory, any error) becomes a note."""
    from kernel_baselines import Unavailable

    try:
        fwd, both, note = _measure(build)
    except Unavailable as err:
        notes.append(f"{prefix}: {err}")
        return False
    except torch.cuda.OutOfMemoryError:
        notes.append(f"{prefix}: out of memory")
        return False
    except Exception as err:  # noqa: BLE001 - keep the other columns of the row
        notes.append(f"{prefix}: failed {type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}")
        return False
    finally:
        torch.cuda.empty_cache()
    row.update({f"{prefix}_fwd_ms": round(fwd, 3), f"{prefix}_bwd_ms": round(both - fwd, 3),
                f"{prefix}_fwdbwd_ms": round(both, 3)})
    if note:
        row[f"{prefix}_ran"] = note
    return True


def _ratio(row, num: str, den: str):
    return f"{row[num] / row[den]:.2f}" if num in row and den in row and row[den] > 0 else ""


def _dense_best(row: dict) -> None:
    """dense_best_{fwd,bwd,fwdbwd}: the fastest dense backend per direction, and our speed-ups
    against it (speedup_* > 1: ours faster)."""
    names = [n for n in ("dense_cudnn", "dense_flash", "dense_flash_attn") if f"{n}_fwd_ms" in row]
    for part in ("fwd", "bwd", "fwdbwd"):
        if names:
            best = min(names, key=lambda n: row[f"{n}_{part}_ms"])
            row[f"dense_best_{part}"] = best[len("dense_"):]
            row[f"dense_best_{part}_ms"] = row[f"{best}_{part}_ms"]
        row[f"speedup_{part}"] = _ratio(row, f"dense_best_{part}_ms", f"nsa_{part}_ms")


def bench_shape(name, S, rows, baselines=BASELINES):
    """One row of --bench: ours (the model layer's call) and ``baselines`` at shape ``name``,
    S tokens, into ``rows``. Columns: nsa_* (ours), dense_{cudnn,flash,flash_attn}_* and
    dense_best_* / speedup_* (against the faster dense per direction); with "peer",
    nsa_peerlike_* (ours with the peer's branches and one K/V) against peer_*; with "fla" at
    FLA's own configuration (l = d = l', w = 0, one K/V), fla_*. ``notes``: what did not run."""
    import kernel_baselines as kb

    from nsa_dist import ops

    sh = SHAPES[name]
    cfg = sh.config()
    row = dict(shape=name, S=S, HQ=sh.HQ, H=sh.H, G=sh.HQ // sh.H, Dk=sh.DK, Dv=sh.DV,
               branches="compression, selection" + (", window" if sh.w else ""),
               kv="one shared K/V" if sh.shared else "K/V per branch")
    notes = []
    x = make_inputs(cfg, S, sh.HQ, sh.H, sh.DK, torch.bfloat16, shared_kv=sh.shared, dv=sh.DV)
    do = torch.randn(1, S, sh.HQ, sh.DV, device=device(), dtype=torch.bfloat16)

    try:  # the selection alone, and the attention given it (where the forward's time goes)
        with torch.no_grad():
            row["nsa_select_ms"] = round(_bench(lambda: ops.select_blocks(x["q"], x["k_cmp"], cfg)), 3)
            idx = ops.select_blocks(x["q"], x["k_cmp"], cfg)
            row["nsa_fwd_given_idx_ms"] = round(_bench(lambda: ops.nsa_attention(
                *(x[k] for k in ORDER), cfg, block_indices=idx, canonical_indices=True)), 3)
            del idx
    except Exception as err:  # noqa: BLE001 - out of memory at this size, or a failure: a note
        notes.append(f"nsa_select: failed {type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}")
        torch.cuda.empty_cache()
    _time_into(row, notes, "nsa", lambda: ours_timed(x, do, cfg, sh.shared))

    q, k, v, gates = x["q"], x["k_sel"], x["v_sel"], x["gates"]
    for b in ("cudnn", "flash"):
        if b in baselines:
            _time_into(row, notes, f"dense_{b}", lambda: kb.sdpa_dense(b, q, k, v, do))
    if "flash_attn" in baselines:
        _time_into(row, notes, "dense_flash_attn", lambda: kb.flash_attn_dense(q, k, v, do))
    _dense_best(row)

    if "fla" in baselines and sh.shared and sh.l == sh.d == sh.ls and sh.w == 0:  # FLA's own function
        if _time_into(row, notes, "fla", lambda: kb.fla_nsa(q, k, v, gates, cfg)):
            for part in ("fwd", "bwd", "fwdbwd"):
                row[f"speedup_vs_fla_{part}"] = _ratio(row, f"fla_{part}_ms", f"nsa_{part}_ms")

    if "peer" in baselines:
        window = sh.w > 0 and kb.peer_has_window()
        pcfg = sh.config(window=sh.w if window else 0)
        row["peer_branches"] = "compression, selection" + (", window" if window else "")
        ours = "nsa"
        if not (sh.shared and pcfg == cfg):  # ours with the peer's branches and one K/V
            ours = "nsa_peerlike"
            _time_into(row, notes, ours, lambda: ours_timed(x, do, pcfg, shared=True))
        if _time_into(row, notes, "peer", lambda: kb.peer_nsa(q, k, v, gates, do, pcfg, window)):
            for part in ("fwd", "bwd", "fwdbwd"):
                row[f"speedup_vs_peer_{part}"] = _ratio(row, f"peer_{part}_ms", f"{ours}_{part}_ms")

    if "nsa_fwd_ms" in row:  # attended keys per query (causal mean): (c) against (a) per key
        keys = (S / 2) / sh.d + sh.n * sh.ls + min(sh.w, S)
        row["nsa_fwd_ns_per_query_key_head"] = f"{row['nsa_fwd_ms'] * 1e6 / (S * sh.HQ * keys):.4f}"
    row["notes"] = " | ".join(notes)
    row["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows.append(row)
    print("[bench] " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    del x
    torch.cuda.empty_cache()


def _calls(name, S):
    """(forward without grad, forward+backward) of the whole NSA function on the shape's inputs."""
    sh = SHAPES[name]
    cfg = sh.config()
    x = {k: v.requires_grad_(True) for k, v in make_inputs(cfg, S, sh.HQ, sh.H, sh.DK, torch.bfloat16,
                                                           dv=sh.DV).items()}
    do = torch.randn(1, S, sh.HQ, sh.DV, device=device(), dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            layer_call(x, cfg)

    def step():
        for t in x.values():
            t.grad = None
        layer_call(x, cfg)[0].backward(do)
    return fwd, step


def _profiled(fn):
    """A torch.profiler record of one ``fn()`` (CUDA activity, synchronized)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof


def profile_shape(name, S):
    """Per-kernel CUDA time of one forward and one forward+backward (torch.profiler), top entries."""
    fwd, step = _calls(name, S)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    for tag, fn in (("forward (no grad)", fwd), ("forward + backward", step)):
        prof = _profiled(fn)
        print(f"[profile] {name} S={S} {tag}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
        # one kernel serves several key kinds (range kernels: compressed, window, forced blocks):
        # its launches one by one, in launch order
        for kname in ("_range_fwd", "_range_bwd_dkdv"):
            ms = [e.time_range.elapsed_us() / 1e3 for e in prof.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA and e.name == kname]
            if ms:
                print(f"[profile] {name} S={S} {tag}: {kname} launches (ms, in order): "
                      + ", ".join(f"{m:.2f}" for m in ms), flush=True)
    torch.cuda.empty_cache()


def profile_peer_shape(name, S):
    """Per-kernel CUDA time of the peer's ``HFNSACore`` and of ours with the peer's branches and
    one K/V (the pair --bench --baselines peer compares): one forward and one forward+backward
    each, so the two can be compared kernel by kernel."""
    import kernel_baselines as kb

    sh = SHAPES[name]
    window = sh.w > 0 and kb.peer_has_window()
    pcfg = sh.config(window=sh.w if window else 0)
    x = make_inputs(pcfg, S, sh.HQ, sh.H, sh.DK, torch.bfloat16, shared_kv=True, dv=sh.DV)
    do = torch.randn(1, S, sh.HQ, sh.DV, device=device(), dtype=torch.bfloat16)
    builds = (("ours (peer's branches)", lambda: ours_timed(x, do, pcfg, shared=True)),
              ("peer", lambda: kb.peer_nsa(x["q"], x["k_sel"], x["v_sel"], x["gates"], do, pcfg, window)))
    for who, build in builds:
        t = build()
        for _ in range(2):
            t.step()
        torch.cuda.synchronize()

        def fwd():
            with torch.no_grad():
                t.fwd()

        def step():
            for g in t.grads:
                g.grad = None
            t.step()
        for tag, fn in (("forward (no grad)", fwd), ("forward + backward", step)):
            prof = _profiled(fn)
            print(f"[profile-peer] {name} S={S} {who}: {tag}")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=50),
                  flush=True)
        del t
        torch.cuda.empty_cache()


def ncu_shape(name, S, setting: str = ""):
    """One forward+backward inside a CUDA profiler range (``ncu --profile-from-start off``
    profiles only its kernels), after two that compile and warm up; ``setting``: launch
    settings ("NAME=VALUE,...") over the defaults."""
    from nsa_dist.kernels.launch import use_launch

    _, step = _calls(name, S)
    with use_launch(launch_config(parse_settings(setting) if setting else {})):
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        step()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    print(f"[ncu] {name} S={S} {setting or 'defaults'}: one forward+backward in the profiler range", flush=True)
    torch.cuda.empty_cache()


def sweep_shape(name, S, keys, rounds=1, rows=None, csv_path=None):
    """Forward and forward+backward time with one launch setting changed at a time (selection
    given), printed and, with ``rows``, appended as rows (setting, value, times, peak memory),
    written to ``csv_path`` after each."""
    from nsa_dist import ops
    from nsa_dist.kernels.nsa import NSAFunction, make_geometry, pack

    sh = SHAPES[name]
    cfg = sh.config()
    x = {k: pack(v).requires_grad_(True)
         for k, v in make_inputs(cfg, S, sh.HQ, sh.H, sh.DK, torch.bfloat16, dv=sh.DV).items()}
    do = torch.randn(S, sh.HQ, sh.DV, device=device(), dtype=torch.bfloat16)
    sc = sh.DK ** -0.5
    idx = ops.select_blocks(x["q"][None].detach(), x["k_cmp"][None].detach(), cfg, backend="triton")[0]
    idx = idx.to(torch.int32)
    options = ([("base", None)] + [(k, v) for k in keys for v in SWEEP[k]]) * rounds
    for key, val in options:
        geo = make_geometry(x["q"][None], x["k_cmp"][None], x["v_sel"][None], cfg, None)
        geo.idx_sorted = True  # idx is the selection kernel's output, as inside nsa_attention
        geo.launch = launch_config(sweep_settings(key, val))

        def fwd():
            with torch.no_grad():
                NSAFunction.apply(*(x[k] for k in ORDER), idx, geo, cfg, sc)

        def step():
            for t in x.values():
                t.grad = None
            NSAFunction.apply(*(x[k] for k in ORDER), idx, geo, cfg, sc).backward(do)
        row = dict(shape=name, S=S, setting=key, value=str(val), changed=str(geo.launch.changed()))
        try:
            f = _bench(fwd)
            ms = _bench(step)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2 ** 30
            row.update(fwd_ms=round(f, 3), bwd_ms=round(ms - f, 3), fwdbwd_ms=round(ms, 3), peak_gib=round(peak, 2))
            print(f"[sweep] {name} S={S} {key}={val}: fwd {f:.2f} ms, fwd+bwd {ms:.2f} ms, bwd {ms - f:.2f} ms, "
                  f"peak memory {peak:.2f} GiB (selection given)", flush=True)
        except Exception as err:  # noqa: BLE001 - a setting that does not compile
            row["failed"] = f"{type(err).__name__}: {str(err)[:100]}"
            print(f"[sweep] {name} S={S} {key}={val}: failed {row['failed']}", flush=True)
        if rows is not None:
            rows.append(row)
            if csv_path:
                _write_csv(csv_path, rows)


def idle_gaps(intervals):
    """Busy time and idle gaps of GPU activity.

    intervals: (start, end, name) of every kernel / copy, on any stream, in any order.
    Returns (span, busy, gaps): span from the first start to the last end, busy the length of
    the union of the intervals, gaps [(length, name before, name after)] longest first.
    """
    ks = sorted(intervals)
    if not ks:
        raise ValueError("no GPU activity to measure")
    busy, (s0, e0, last) = 0.0, ks[0]
    gaps = []
    for s, e, name in ks[1:]:
        if s > e0:  # nothing ran between e0 and s
            busy += e0 - s0
            gaps.append((s - e0, last, name))
            s0, e0 = s, e
        elif e > e0:
            e0 = e
        if e >= e0:
            last = name  # the interval that ends last so far
    busy += e0 - s0
    return ks[-1][1] - ks[0][0], busy, sorted(gaps, reverse=True)


def gpu_gaps(tag: str, fn, top: int = 5):
    """Busy and idle GPU time of one ``fn()`` call (after warm-up), from a profiler trace.
    Returns (span_ms, busy_ms, idle_ms); see ``idle_gaps``."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:  # tens of MB; only the summary is kept
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    ks = [(e["ts"], e["ts"] + e["dur"], e["name"][:48]) for e in events
          if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    span, busy, gaps = idle_gaps(ks)
    print(f"[gaps] {tag}: span {span / 1e3:.2f} ms, GPU busy {busy / 1e3:.2f} ms, idle {(span - busy) / 1e3:.2f} ms, "
          f"{len(ks)} kernels / copies", flush=True)
    for g, a, b in gaps[:top]:
        print(f"[gaps]   {g / 1e3:.3f} ms between {a} and {b}", flush=True)
    return span / 1e3, busy / 1e3, (span - busy) / 1e3


def gaps_shape(name, S):
    """GPU idle time of one forward (no grad) and one forward+backward of the whole NSA function."""
    fwd, step = _calls(name, S)
    gpu_gaps(f"{name}_S{S}_fwd", fwd)
    gpu_gaps(f"{name}_S{S}_fwdbwd", step)
    torch.cuda.empty_cache()


def parse_settings(text: str) -> dict:
    """"NAME=VALUE,..." -> {NAME: VALUE}: Python literals (``range_fwd=(8, 3)``), a bare word as
    a string (``sel_algo=block``)."""
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        call = None
    if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
        raise SystemExit(f"--ab / --sweep settings are NAME=VALUE[,NAME=VALUE...], got {text!r}")
    out = {}
    for kw in call.keywords:
        out[kw.arg] = kw.value.id if isinstance(kw.value, ast.Name) else ast.literal_eval(kw.value)
    return out


def launch_config(settings: dict):
    """A LaunchConfig with ``settings`` over the defaults; a bad name or value ends the tool
    with LaunchConfig's message (it names the valid settings)."""
    from nsa_dist.kernels.launch import LaunchConfig

    try:
        return LaunchConfig(**settings)
    except ValueError as err:
        raise SystemExit(f"launch settings {settings}: {err}") from None


def ab_shape(name, S, setting: str, rounds: int, rows=None, csv_path=None):
    """The whole function (as --bench, ours only) with the launch settings ``setting``
    ("NAME=VALUE,...", LaunchConfig fields) and with the defaults, A B then B A, for ``rounds``
    rounds; each run's bench row (with ab_setting / ab_label / ab_round) into ``rows``, written
    to ``csv_path`` after each."""
    from nsa_dist.kernels.launch import LaunchConfig, use_launch

    changed = launch_config(parse_settings(setting))
    rows = [] if rows is None else rows
    for rnd in range(rounds):
        # A B, then B A: neither setting always runs first in a round
        order = (("changed", changed), ("default", LaunchConfig()))
        for label, launch in (order if rnd % 2 == 0 else order[::-1]):
            with use_launch(launch):
                bench_shape(name, S, rows, baselines=())
            r = rows[-1]
            r.update(ab_setting=setting, ab_label=label, ab_round=rnd)
            if csv_path:
                _write_csv(csv_path, rows)
            print(f"[ab] {name} S={S} round {rnd} {label} {changed.changed()}: fwd {r.get('nsa_fwd_ms')} ms, "
                  f"bwd {r.get('nsa_bwd_ms')} ms", flush=True)
    return rows


def parse_sizes(text: str) -> list[int]:
    """"16k,65536" -> [16384, 65536]."""
    try:
        return [int(t[:-1]) * 1024 if t.lower().endswith("k") else int(t) for t in text.split(",") if t]
    except ValueError:
        raise SystemExit(f"--sizes takes token counts such as 32768 or 32k, comma-separated; got {text!r}") from None


def _names(text: str, valid, what: str) -> list[str]:
    names = [t for t in text.split(",") if t]
    unknown = [t for t in names if t not in valid]
    if unknown:
        raise SystemExit(f"{what}: {unknown} unknown; choose from {', '.join(valid)}")
    return names


TABLE = ["shape", "S", "nsa_fwd_ms", "nsa_bwd_ms", "dense_cudnn_fwd_ms", "dense_cudnn_bwd_ms", "dense_flash_fwd_ms",
         "dense_flash_bwd_ms", "speedup_fwd", "speedup_bwd", "nsa_peerlike_fwd_ms", "nsa_peerlike_bwd_ms", "peer_fwd_ms",
         "peer_bwd_ms", "speedup_vs_peer_fwd", "speedup_vs_peer_bwd", "fla_fwd_ms", "fla_bwd_ms", "notes"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="correctness against the reference")
    ap.add_argument("--bench", action="store_true", help="timings")
    ap.add_argument("--sizes", default="8192,16384,32768,65536", help="tokens, e.g. 32k,64k")
    ap.add_argument("--shapes", default="a_paper,b_fla,c_small_g,d_seeds", help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--baselines", default=",".join(BASELINES), help="what --bench compares with ('' for none)")
    ap.add_argument("--samples", type=int, default=SAMPLES, help="timed calls behind each median")
    ap.add_argument("--profile", action="store_true", help="per-kernel times at the largest size")
    ap.add_argument("--profile-peer", action="store_true", help="per-kernel times of the peer and of ours "
                    "with its branches, at the largest size")
    ap.add_argument("--ncu", action="store_true", help="one call in a CUDA profiler range (for ncu)")
    ap.add_argument("--launch", default="", help="NAME=VALUE[,...]: LaunchConfig settings of the --ncu call")
    ap.add_argument("--gaps", action="store_true", help="GPU idle time in one call at the largest size")
    ap.add_argument("--sweep", action="store_true", help="launch-setting sweep at the largest size")
    ap.add_argument("--sweep-keys", default=",".join(SWEEP), help="which launch settings to sweep")
    ap.add_argument("--rounds", type=int, default=1, help="repeats of --sweep / --ab, interleaved")
    ap.add_argument("--ab", default="", help="NAME=VALUE[,...]: LaunchConfig settings (kernels/launch.py) "
                    "against the defaults")
    ap.add_argument("--out", default=".", help="folder for the CSV files")
    ap.add_argument("--tag", default="", help="suffix of the CSV names (kernel_bench<tag>.csv, ...)")
    ap.add_argument("--append", action="store_true", help="keep the rows already in kernel_bench<tag>.csv "
                    "(one process per shape, one file)")
    a = ap.parse_args(argv)
    shapes = _names(a.shapes, SHAPES, "--shapes")
    baselines = _names(a.baselines, BASELINES, "--baselines")
    sweep_keys = _names(a.sweep_keys, SWEEP, "--sweep-keys") if a.sweep else []
    sizes = parse_sizes(a.sizes)
    if a.launch and not a.ncu:
        raise SystemExit("--launch sets the launch settings of the --ncu call only: add --ncu, or use --ab "
                         "NAME=VALUE to time settings against the defaults")
    for text in (a.ab, a.launch):
        if text:
            launch_config(parse_settings(text))  # a bad setting ends the tool before any GPU work
    if a.samples < 1:
        raise SystemExit(f"--samples must be >= 1, got {a.samples}")
    globals()["SAMPLES"] = a.samples
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA device")
    os.makedirs(a.out, exist_ok=True)
    out = lambda kind: os.path.join(a.out, f"kernel_{kind}{a.tag}.csv")  # noqa: E731
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} "
          f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    if a.check:
        run_checks(a.out)
    if a.sweep:
        rows = []
        for name in shapes:
            sweep_shape(name, max(sizes), sweep_keys, a.rounds, rows, out("sweep"))
    if a.ab:
        rows = []
        for name in shapes:
            ab_shape(name, max(sizes), a.ab, a.rounds, rows, out("ab"))
    if a.profile:
        for name in shapes:
            profile_shape(name, max(sizes))
    if a.profile_peer:
        for name in shapes:
            profile_peer_shape(name, max(sizes))
    if a.ncu:
        for name in shapes:
            ncu_shape(name, max(sizes), a.launch)
    if a.gaps:
        for name in shapes:
            gaps_shape(name, max(sizes))
    if a.bench:
        rows = _read_csv(out("bench")) if a.append else []
        for name in shapes:
            for S in sizes:
                try:
                    bench_shape(name, S, rows, baselines)
                except Exception as err:  # noqa: BLE001 - out of memory at this size: a row that says so
                    rows.append(dict(shape=name, S=S, notes=f"failed: {type(err).__name__}: {str(err)[:200]}"))
                    print(f"[bench] {name} S={S} failed: {type(err).__name__}: {err}", flush=True)
                    torch.cuda.empty_cache()
                _write_csv(out("bench"), rows)
        print(" | ".join(TABLE))
        for r in rows:
            print(" | ".join(str(r.get(c, "")) for c in TABLE))


if __name__ == "__main__":
    main()

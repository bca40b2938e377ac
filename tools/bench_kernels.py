"""GPU correctness check and benchmark of the Triton NSA kernels (issue 5).

Usage (on a CUDA machine, from the repository root):
    python tools/bench_kernels.py --check --bench --out results/
--check: bf16 kernels against the fp32 PyTorch reference (relative RMS error of the output
and every gradient; selection agreement), several group sizes, packed sequences.
--bench: medians of triton.testing.do_bench for the issue's shapes (a) paper, (b) FLA's,
(c) small groups, forward and forward+backward, against dense causal SDPA (flash backend,
enable_gqa) and FLA's parallel_nsa when fla-core is importable. Prints a table, writes CSV.
The NSA call timed (--bench, --profile, --gaps) is ``layer_call``: the model layer's one
call, ops.nsa_attention(..., return_indices=True), selection inside.
--profile: per-kernel CUDA time of one forward and of one forward+backward.
--gaps: GPU idle time inside one forward and one forward+backward (no kernel running on any
stream), from a torch.profiler trace, with the longest gaps and the kernels around them.
--sweep: one launch setting changed at a time (selection given), --rounds times interleaved.
--ab NAME=VALUE[,...]: the whole function (as --bench) with these LaunchConfig settings
(kernels/launch.py, e.g. sel_dkdv_seg_rows=1024,range_fwd=(8,3)) and with the defaults, A B
then B A for --rounds rounds in one process: A/B of a default, free of the spread between
processes.
"""
from __future__ import annotations

import argparse
import ast
import csv
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # nsa_dist from this checkout when it is not installed


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def make_inputs(cfg, S, HQ, H, D, dtype, seed=0, cu_seqlens=None, shared_kv=False):
    from nsa_dist.ops import compress

    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.float32)
    q = r(1, S, HQ, D)
    k, v = r(1, S, H, D), r(1, S, H, D)
    if shared_kv:
        ks, vs, kw, vw, kr, vr = k, v, k, v, k, v
    else:
        ks, vs, kw, vw, kr, vr = r(1, S, H, D), r(1, S, H, D), r(1, S, H, D), r(1, S, H, D), k, v
    x = dict(q=q, k_cmp=compress(kr, cfg, cu_seqlens=cu_seqlens), v_cmp=compress(vr, cfg, cu_seqlens=cu_seqlens),
             k_sel=ks, v_sel=vs, k_win=kw, v_win=vw,
             gates=torch.rand(1, S, HQ, 3, generator=g, device="cuda"))
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
    if not rows:
        return
    from nsa_dist.fileio import atomic_open

    with atomic_open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _bench(fn, grad_inputs=None):
    import triton

    def step():
        if grad_inputs is not None:
            for t in grad_inputs:
                t.grad = None
        fn()
    # do_bench counts its warm-up and repeats in ms, divided by its own estimate (5 calls,
    # which come out a little slower): at a fixed 50 / 200 ms a 140 ms call was timed once.
    # Sized from one timed call, with room for that estimate, every median has >= 10 samples
    # after >= 3 warm-up calls, however long the call is.
    step()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    step()
    b.record()
    torch.cuda.synchronize()
    est = a.elapsed_time(b)
    return triton.testing.do_bench(step, warmup=max(50.0, 4 * est), rep=max(200.0, 12 * est),
                                   return_mode="median")


SHAPES = {
    # name: (HQ, H, D, l, d, l', n, w, shared K/V)
    "a_paper": (64, 4, 128, 32, 16, 64, 16, 512, False),
    "b_fla": (64, 4, 128, 64, 64, 64, 16, 0, True),
    "c_small_g": (32, 8, 128, 32, 16, 64, 16, 512, False),
    # group-size sweep of the selected kernels (not in the default table)
    "g1": (8, 8, 128, 32, 16, 64, 16, 512, False),
    "g2": (16, 8, 128, 32, 16, 64, 16, 512, False),
    "g8": (64, 8, 128, 32, 16, 64, 16, 512, False),
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
    # segment lengths: of lists the block-major forward / dq walk too (G < 16), and of a list
    # the selected dK/dV walks alone (G >= 16), with two of its launch variants
    "sel_seg_rows": [256, 2048, 4096, 8192, 16384],
    "sel_dkdv_seg_rows": [1024, 2048, 4096, 16384, {"sel_dkdv_seg_rows": 8192, "sel_dkdv": (8, 2)},
                          {"sel_dkdv_seg_rows": 8192, "sel_dkdv_rows": 128, "sel_dkdv": (8, 2)}],
    "split_bytes": [1 << 28, 1 << 32],
    "sel_split": [(4, 3), (8, 2)],
    "sel_combine": [(8, 1)],
    "sel_dkdv": [(4, 2), (8, 2)],
    "sel_rows": [8, 32],
    "sel_dq": [(4, 2), (8, 2), (8, 3)],
    "dkdv_keys": [32, 128],
    "range_dkdv": [(8, 2), (4, 3)],
    "range_fwd": [(4, 2), (8, 3)],
    "range_dq": [(4, 3), (8, 2)],
    "sel_fwd": [(4, 2), (8, 3)],
    "dkdv_qchunk": [2048, 8192, 1 << 30],
    "first_programs": [128, 2048],
    # rows / keys per step of one kernel (the range forward and dq; each block-major kernel)
    "range_fwd_rows": [32, 128, {"range_fwd_rows": 128, "range_fwd": (8, 3)}],
    "range_fwd_keys": [16, 64, 128, {"range_fwd_keys": 128, "range_fwd": (8, 3)}],
    "range_dq_rows": [32, 128, {"range_dq_rows": 128, "range_dq": (8, 2)}],
    "range_dq_keys": [32, 128],
    "sel_split_rows": [32, 128, {"sel_split_rows": 128, "sel_split": (8, 2)}],
    "sel_dq_split_rows": [32, 128, {"sel_dq_split_rows": 128, "sel_dq_split": (8, 2)}],
    "sel_dkdv_rows": [32, 128, {"sel_dkdv_rows": 128, "sel_dkdv": (8, 2)}],
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


def bench_shape(name, S, rows):
    from nsa_dist import NSAConfig, ops
    from nsa_dist.ops import compress

    HQ, H, D, l, d, ls, n, w, shared = SHAPES[name]
    cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=ls, num_selected=n, window=w)
    x = make_inputs(cfg, S, HQ, H, D, torch.bfloat16, shared_kv=shared)
    leaves = {k: v.requires_grad_(True) for k, v in x.items()}
    do = torch.randn(1, S, HQ, D, device="cuda", dtype=torch.bfloat16)
    res = {}

    if shared:  # one K/V for every branch; compression (mean pooling) inside the timed call, as FLA
        kk, vv = torch.randn_like(x["k_sel"]).requires_grad_(True), torch.randn_like(x["v_sel"]).requires_grad_(True)
        qq, gg = leaves["q"], leaves["gates"]

        def nsa():
            kc, vc = compress(kk, cfg), compress(vv, cfg)
            return layer_call(dict(q=qq, k_cmp=kc, v_cmp=vc, k_sel=kk, v_sel=vv, k_win=kk, v_win=vv, gates=gg),
                              cfg)[0]
        grads = [qq, kk, vv, gg]
    else:
        def nsa():
            return layer_call(leaves, cfg)[0]
        grads = list(leaves.values())
    with torch.no_grad():
        res["nsa_select_ms"] = _bench(lambda: ops.select_blocks(x["q"], x["k_cmp"], cfg))
        idx = ops.select_blocks(x["q"], x["k_cmp"], cfg)
        res["nsa_fwd_given_idx_ms"] = _bench(lambda: ops.nsa_attention(
            *(x[k] for k in ORDER), cfg, block_indices=idx, canonical_indices=True))
        res["nsa_fwd_ms"] = _bench(nsa)
    res["nsa_fwdbwd_ms"] = _bench(lambda: nsa().backward(do), grads)
    res["nsa_bwd_ms"] = res["nsa_fwdbwd_ms"] - res["nsa_fwd_ms"]

    if name == "b_fla":
        try:
            from fla.ops.nsa import parallel_nsa
        except Exception as err:  # noqa: BLE001 - report and go on
            print(f"[bench] FLA unavailable: {err}")
        else:
            gc_, gs_ = leaves["gates"][..., 0].detach().contiguous().requires_grad_(True), \
                leaves["gates"][..., 1].detach().contiguous().requires_grad_(True)

            def fla():
                return parallel_nsa(qq, kk, vv, gc_, gs_, None, block_counts=n, block_size=ls, window_size=0)
            with torch.no_grad():
                res["base_fwd_ms"] = _bench(fla)
            res["base_fwdbwd_ms"] = _bench(lambda: fla().backward(do), [qq, kk, vv, gc_, gs_])
            res["base_bwd_ms"] = res["base_fwdbwd_ms"] - res["base_fwd_ms"]
            res["baseline"] = "fla.parallel_nsa"
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        qd = x["q"].transpose(1, 2).detach().requires_grad_(True)
        kd = x["k_sel"].transpose(1, 2).detach().requires_grad_(True)
        vd = x["v_sel"].transpose(1, 2).detach().requires_grad_(True)
        dod = do.transpose(1, 2)

        def dense():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True,
                                                                        enable_gqa=True)
        with torch.no_grad():
            res["base_fwd_ms"] = _bench(dense)
        res["base_fwdbwd_ms"] = _bench(lambda: dense().backward(dod), [qd, kd, vd])
        res["base_bwd_ms"] = res["base_fwdbwd_ms"] - res["base_fwd_ms"]
        res["baseline"] = "sdpa_flash_causal"
    row = dict(shape=name, S=S, HQ=HQ, H=H, D=D, **{k: (f"{v:.3f}" if isinstance(v, float) else v)
                                                    for k, v in res.items()})
    if "base_fwd_ms" in res:
        row["speedup_fwd"] = f"{res['base_fwd_ms'] / res['nsa_fwd_ms']:.2f}"
        row["speedup_bwd"] = f"{res['base_bwd_ms'] / res['nsa_bwd_ms']:.2f}"
    # attended keys per query (causal mean, NSA as computed): for (c) vs (a) per-key comparison
    keys = (S / 2) / d + n * ls + min(w, S)
    row["nsa_fwd_ns_per_query_key_head"] = f"{res['nsa_fwd_ms'] * 1e6 / (S * HQ * keys):.4f}"
    rows.append(row)
    print("[bench] " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    del x, leaves
    torch.cuda.empty_cache()


def _calls(name, S):
    """(forward without grad, forward+backward) of the whole NSA function on the shape's inputs."""
    from nsa_dist import NSAConfig

    HQ, H, D, l, d, ls, n, w, shared = SHAPES[name]
    cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=ls, num_selected=n, window=w)
    x = {k: v.requires_grad_(True) for k, v in make_inputs(cfg, S, HQ, H, D, torch.bfloat16).items()}
    do = torch.randn(1, S, HQ, D, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            layer_call(x, cfg)

    def step():
        for t in x.values():
            t.grad = None
        layer_call(x, cfg)[0].backward(do)
    return fwd, step


def profile_shape(name, S):
    """Per-kernel CUDA time of one forward and one forward+backward (torch.profiler), top entries."""
    from torch.profiler import ProfilerActivity, profile

    fwd, step = _calls(name, S)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    for tag, fn in (("forward (no grad)", fwd), ("forward + backward", step)):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
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


def sweep_shape(name, S, keys, rounds=1):
    """Forward and forward+backward time with one launch setting changed at a time."""
    from nsa_dist import NSAConfig, ops
    from nsa_dist.kernels.nsa import NSAFunction, make_geometry, pack

    HQ, H, D, l, d, ls, n, w, shared = SHAPES[name]
    cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=ls, num_selected=n, window=w)
    x = {k: pack(v).requires_grad_(True) for k, v in make_inputs(cfg, S, HQ, H, D, torch.bfloat16).items()}
    do = torch.randn(S, HQ, D, device="cuda", dtype=torch.bfloat16)
    sc = D ** -0.5
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
        try:
            f = _bench(fwd)
            ms = _bench(step)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2 ** 30
            print(f"[sweep] {name} S={S} {key}={val}: fwd {f:.2f} ms, fwd+bwd {ms:.2f} ms, bwd {ms - f:.2f} ms, "
                  f"peak memory {peak:.2f} GiB (selection given)", flush=True)
        except Exception as err:  # noqa: BLE001 - a setting that does not compile
            print(f"[sweep] {name} S={S} {key}={val}: failed {type(err).__name__}: {str(err)[:100]}", flush=True)


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


def ab_shape(name, S, setting: str, rounds: int):
    """The whole function (as --bench) with the launch settings ``setting`` ("NAME=VALUE,...",
    LaunchConfig fields) and with the defaults, A B then B A, for ``rounds`` rounds."""
    from nsa_dist.kernels.launch import LaunchConfig, use_launch

    changed = launch_config(parse_settings(setting))
    rows = []
    for rnd in range(rounds):
        # A B, then B A: neither setting always runs first in a round
        order = (("changed", changed), ("default", LaunchConfig()))
        for label, launch in (order if rnd % 2 == 0 else order[::-1]):
            with use_launch(launch):
                bench_shape(name, S, rows)
            r = rows[-1]
            print(f"[ab] {name} S={S} round {rnd} {label} {changed.changed()}: fwd {r['nsa_fwd_ms']} ms, "
                  f"bwd {r['nsa_bwd_ms']} ms, speed-up fwd {r.get('speedup_fwd')} bwd {r.get('speedup_bwd')}",
                  flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="correctness against the reference")
    ap.add_argument("--bench", action="store_true", help="timings")
    ap.add_argument("--sizes", default="8192,16384,32768,65536")
    ap.add_argument("--shapes", default="a_paper,b_fla,c_small_g")
    ap.add_argument("--profile", action="store_true", help="per-kernel times at the largest size")
    ap.add_argument("--gaps", action="store_true", help="GPU idle time in one call at the largest size")
    ap.add_argument("--sweep", action="store_true", help="launch-setting sweep at the largest size")
    ap.add_argument("--sweep-keys", default=",".join(SWEEP), help="which launch settings to sweep")
    ap.add_argument("--rounds", type=int, default=1, help="repeats of --sweep / --ab, interleaved")
    ap.add_argument("--ab", default="", help="NAME=VALUE[,...]: LaunchConfig settings (kernels/launch.py) "
                    "against the defaults")
    ap.add_argument("--out", default=".", help="folder for the CSV files")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA device")
    os.makedirs(a.out, exist_ok=True)
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} "
          f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    if a.check:
        run_checks(a.out)
    if a.sweep:
        unknown = sorted(set(a.sweep_keys.split(",")) - set(SWEEP))
        if unknown:
            raise SystemExit(f"--sweep-keys: {unknown} not in the sweep table; choose from {', '.join(SWEEP)}")
        for name in a.shapes.split(","):
            sweep_shape(name, max(int(s) for s in a.sizes.split(",")), a.sweep_keys.split(","), a.rounds)
    if a.ab:
        for name in a.shapes.split(","):
            ab_shape(name, max(int(s) for s in a.sizes.split(",")), a.ab, a.rounds)
    if a.profile:
        for name in a.shapes.split(","):
            profile_shape(name, max(int(s) for s in a.sizes.split(",")))
    if a.gaps:
        for name in a.shapes.split(","):
            gaps_shape(name, max(int(s) for s in a.sizes.split(",")))
    if a.bench:
        rows = []
        for name in a.shapes.split(","):
            for S in (int(s) for s in a.sizes.split(",")):
                try:
                    bench_shape(name, S, rows)
                except Exception as err:  # noqa: BLE001 - keep the other sizes
                    print(f"[bench] {name} S={S} failed: {type(err).__name__}: {err}", flush=True)
        _write_csv(os.path.join(a.out, "kernel_bench.csv"), rows)
        cols = ["shape", "S", "nsa_fwd_ms", "nsa_bwd_ms", "base_fwd_ms", "base_bwd_ms", "speedup_fwd",
                "speedup_bwd", "nsa_select_ms", "nsa_fwd_given_idx_ms", "nsa_fwd_ns_per_query_key_head"]
        print(" | ".join(cols))
        for r in rows:
            print(" | ".join(str(r.get(c, "")) for c in cols))


if __name__ == "__main__":
    main()

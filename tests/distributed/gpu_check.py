"""The distributed checks on GPUs over NCCL, and per-layout timings (not part of CI).

    python tests/distributed/gpu_check.py --gpus 4 [--seq 16384]

1. Every layout of test_parallel_layouts.py that fits on the GPUs, with CUDA tensors and
   NCCL instead of gloo (fp32, reference NSA backend): same assertions as the CPU tests.
2. The same comparison in bf16 with the Triton kernels at a mid-size model (S=4096,
   G=4), against an fp64 oracle (the reference backend, same weights, on the GPU): every
   gradient of the layout is within BF16_REL_RMS of fp64, or no further from it than
   BF16_VS_ONE times one GPU's bf16 gradient is. The second clause is for gradients that are
   sums of nearly cancelling terms (the key compressor's biases: the softmax is invariant to
   a shift of all keys), whose bf16 error is large on one GPU too; gradients that are zero
   in exact arithmetic (fp64 norm below 1e-10 of the largest) hold only rounding noise and
   are left out. Also: the relative error of the loss <= BF16_REL_RMS, and the share of
   query rows whose selected blocks differ from one GPU <= BF16_SEL_ROWS (bf16 rounding of
   TP-sliced projections moves near-tied block scores).
3. Timings at a mid-size model (bf16): forward + backward per step of each layout, the
   bytes CommStats recorded, and the time of those collectives replayed alone.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import dist_workers as W  # noqa: E402
from dist_harness import run_world  # noqa: E402
from nsa_dist import ModelConfig, NSAConfig  # noqa: E402
from nsa_dist.parallel import CommStats, ParallelState, gather_full, parallelize  # noqa: E402

LAYOUTS = [
    ("tp2", 2, dict(tp=2)),
    ("tp2_megatron_sp", 2, dict(tp=2, megatron_sp=True)),
    ("ulysses2", 2, dict(sp=2)),
    ("tp4_h2", 4, dict(tp=4, num_heads=4, num_kv_heads=2)),
    ("ulysses4_h2", 4, dict(sp=4, num_heads=4, num_kv_heads=2)),
    ("tp2_x_ulysses2", 4, dict(tp=2, sp=2, num_heads=8, num_kv_heads=2)),
    ("tp4_h2_importance", 4, dict(tp=4, num_heads=4, num_kv_heads=2, selection_comm="importance")),
    ("tp4_h1_packed", 4, dict(tp=4, num_heads=4, num_kv_heads=1, packed=True)),
]


BF16_REL_RMS = 2e-2
BF16_VS_ONE = 2.0
BF16_SEL_ROWS = 2e-2
BF16_LAYOUTS = [("tp2", 2, dict(tp=2)), ("ulysses2", 2, dict(sp=2)), ("tp4", 4, dict(tp=4)),
                ("ulysses4", 4, dict(sp=4)), ("tp2_x_ulysses2", 4, dict(tp=2, sp=2)),
                ("tp4_h2_importance", 4, dict(tp=4, num_kv_heads=2, num_heads=8))]


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def bf16_worker(rank, world, tp=1, sp=1, num_heads=16, num_kv_heads=4, S=4096, dtype="bfloat16"):
    """One GPU vs the layout, both bf16 with the Triton backend, same weights and batch
    (on a CPU, for a smoke test of this code: gloo, the reference backend, ``dtype``)."""
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    cfg = ModelConfig(vocab_size=2048, hidden_size=512, num_layers=2, num_heads=num_heads,
                      num_kv_heads=num_kv_heads, head_dim=64, intermediate_size=1024, max_seq_len=S,
                      nsa=NSAConfig(phi="mlp"))
    state = ParallelState(world, rank, tp=tp, sp=sp)
    model = W.build_model(cfg, device=str(dev), backend="auto")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (1, S), generator=g).to(dev)
    labels = torch.roll(ids, -1, 1)
    # fp64 oracle with the same weights (reference backend); gradients zero in exact
    # arithmetic (the phi bias of K shifts every score of a softmax equally) are left out
    oracle = W.build_model(cfg, device=str(dev), backend="reference")
    oracle.load_state_dict(model.state_dict())
    oracle = oracle.double()
    oracle(ids, labels).loss.backward()
    g64 = {n: p.grad.detach().clone() for n, p in oracle.named_parameters()}
    del oracle
    rms64 = {n: float(g.pow(2).mean().sqrt()) for n, g in g64.items()}
    live = [n for n in rms64 if rms64[n] > 1e-10 * max(rms64.values())]
    model = model.to(getattr(torch, dtype))
    out = model(ids, labels, return_stats=True)
    out.loss.backward()
    full = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    pm = parallelize(model, state)
    pout = pm(ids, labels, return_stats=True)
    pout.loss.backward()
    W.sync_grads(pm, state)
    par = gather_full(pm, state, "grad")
    errs = sorted(((_rel_rms(par[n], full[n]), n) for n in live), reverse=True)
    grad_err, worst = errs[0]  # layout vs one GPU, both bf16 (reported)
    vs64 = {n: (_rel_rms(par[n], g64[n]), _rel_rms(full[n], g64[n])) for n in live}
    bad = [(n, f"layout {e:.2e}", f"one GPU {e1:.2e}") for n, (e, e1) in vs64.items()
           if e > max(BF16_REL_RMS, BF16_VS_ONE * e1)]
    worst64 = max(vs64, key=lambda n: vs64[n][0])
    rows, differ = 0, 0
    for layer, (ps_, fs) in enumerate(zip(pout.stats or [], out.stats or [])):
        if pm.layers[layer].attn.comm.layout.kv_global_start == 0:
            a, b = ps_.selected_blocks.sort(-1).values, fs.selected_blocks.sort(-1).values
            rows += a.shape[0]
            differ += int((a != b).any(-1).sum())
    loss_err = abs(float(pout.loss) - float(out.loss)) / abs(float(out.loss))
    sel = differ / max(rows, 1)
    assert loss_err <= BF16_REL_RMS, f"loss differs by {loss_err:.2e} (relative)"
    assert not bad, f"gradients further from fp64 than one GPU's bf16 allows: {bad[:3]}"
    assert sel <= BF16_SEL_ROWS, f"{differ}/{rows} selection rows differ"
    assert rows > 0 or rank > 0, "rank 0 holds KV head 0 and must have compared its selection"
    return {"loss_rel_err": loss_err, "grad_rel_rms": grad_err, "worst_grad": worst,
            "worst_vs_fp64": (worst64, *vs64[worst64]), "zero_grads_skipped": sorted(set(full) - set(live)),
            "sel_rows_differ": differ, "sel_rows": rows}


def _replay(rows: list[dict], group_of, steps: int) -> float:
    """Seconds per step spent in the recorded collectives, replayed alone."""
    dev = torch.device("cuda", torch.cuda.current_device())
    ops = []
    for r in rows:
        calls = max(1, r["calls"] // steps)
        n = r["payload_bytes"] // max(r["calls"], 1) // 2  # bf16 elements per call
        g, p = group_of(r)
        if g is None or p == 1 or n == 0:
            continue
        n = max(p, n - n % p)
        ops.append((r["op"], n, g, p, calls))

    def run():
        for op, n, g, p, calls in ops:
            for _ in range(calls):
                x = torch.empty(n, dtype=torch.bfloat16, device=dev)
                if op == "all_reduce":
                    dist.all_reduce(x, group=g)
                elif op == "all_gather":
                    dist.all_gather_into_tensor(x, x[: n // p].clone(), group=g)
                elif op == "reduce_scatter":
                    dist.reduce_scatter_tensor(x[: n // p].clone(), x, group=g)
                else:
                    dist.all_to_all_single(torch.empty_like(x), x, group=g)
    run()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / 3


def timing_worker(rank, world, tp=1, sp=1, megatron_sp=False, S=16384, steps=3):
    dev = torch.device("cuda", torch.cuda.current_device())
    cfg = ModelConfig(vocab_size=32000, hidden_size=2048, num_layers=2, num_heads=32, num_kv_heads=4,
                      head_dim=64, intermediate_size=5632, max_seq_len=S, nsa=NSAConfig(phi="mlp"))
    state = ParallelState(world, rank, tp=tp, sp=sp)
    torch.manual_seed(0)
    model = W.NSADecoderLM(cfg, backend="reference").to(dev, torch.bfloat16)
    stats = CommStats()
    pm = parallelize(model, state, megatron_sp=megatron_sp, comm_stats=stats)
    del model
    ids = torch.randint(0, cfg.vocab_size, (1, S), device=dev)

    def step():
        loss = pm(ids, ids).loss
        loss.backward()
        return loss

    step()
    torch.cuda.synchronize()
    stats.reset()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t) / steps
    rows = stats.rows()

    def group_of(r):
        tag = r["tag"]
        if "ulysses" in tag:
            return state.sp_group, state.sp
        if "importance" in tag or "selection_q" in tag:
            _, g = state.kv_share_group(cfg.num_kv_heads)
            return g, (state.head_parallel // cfg.num_kv_heads)
        if "kv_replica" in tag:
            _, g = state.tp_kv_share_group(cfg.num_kv_heads)
            return g, state.tp // cfg.num_kv_heads
        if tag.startswith("lm_head") and r["op"] == "all_reduce" and r["phase"] == "fwd" and state.sp > 1:
            return state.sp_group, state.sp
        return state.tp_group, state.tp

    comm_s = _replay(rows, group_of, steps)
    return {"step_ms": step_s * 1e3, "wire_MiB_per_step": stats.total() / steps / 2**20,
            "comm_replay_ms": comm_s * 1e3, "max_mem_GiB": torch.cuda.max_memory_allocated() / 2**30}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--skip-check", action="store_true", help="same as --parts time")
    ap.add_argument("--parts", default="check,bf16,time", help="any of check (fp32 reference), bf16 "
                    "(Triton), time (per-layout timings)")
    args = ap.parse_args()
    print(f"{args.gpus} GPUs: {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    parts = {"time"} if args.skip_check else set(args.parts.split(","))
    failed = []
    if "check" in parts:
        for name, world, kw in LAYOUTS:
            if world > args.gpus:
                continue
            t = time.time()
            res = run_world(W.layout_worker, world, start_method="spawn", dist_backend="nccl",
                            device="cuda", **kw)
            r = res[0]
            print(f"check {name:<22} OK  loss_err {r['loss_err']:.1e} layer_out_err {r['layer_out_err']:.1e} "
                  f"layer_grad_err {r['layer_grad_err']:.1e} model_grad_err {r['model_grad_err']:.1e} "
                  f"({time.time() - t:.1f} s)", flush=True)
    if "bf16" in parts:
        for name, world, kw in BF16_LAYOUTS:
            if world > args.gpus:
                continue
            t = time.time()
            try:
                r = run_world(bf16_worker, world, start_method="spawn", dist_backend="nccl", **kw)[0]
            except Exception as err:  # noqa: BLE001 - report every layout, then fail
                failed.append(name)
                print(f"bf16  {name:<22} FAIL {str(err).strip().splitlines()[-1][:200]}", flush=True)
                continue
            wn, we, we1 = r["worst_vs_fp64"]
            print(f"bf16  {name:<22} OK  loss_rel_err {r['loss_rel_err']:.1e}; vs fp64, worst gradient "
                  f"{wn}: layout {we:.1e}, one GPU {we1:.1e}; layout vs one GPU {r['grad_rel_rms']:.1e} "
                  f"({r['worst_grad']}); {len(r['zero_grads_skipped'])} zero-in-exact-arithmetic gradients "
                  f"skipped; selection rows differing {r['sel_rows_differ']}/{r['sel_rows']} "
                  f"({time.time() - t:.1f} s)", flush=True)
    g = args.gpus
    for name, kw in [] if "time" not in parts else [(f"TP={g}", dict(tp=g)), (f"TP={g}+SP", dict(tp=g, megatron_sp=True)),
                     (f"Ulysses={g}", dict(sp=g)), (f"TP=2xUlysses={g // 2}", dict(tp=2, sp=g // 2))]:
        res = run_world(timing_worker, g, start_method="spawn", dist_backend="nccl", S=args.seq, **kw)
        r = res[0]
        print(f"time  {name:<18} S={args.seq}: step {r['step_ms']:.1f} ms, wire {r['wire_MiB_per_step']:.1f} "
              f"MiB/rank/step, collectives replayed alone {r['comm_replay_ms']:.2f} ms, "
              f"peak {r['max_mem_GiB']:.1f} GiB", flush=True)
    if failed:
        raise SystemExit(f"failed: {failed}")


if __name__ == "__main__":
    main()

"""Each layout against one device: layer output, dx, every parameter gradient, selected
blocks, model loss and every model gradient (real processes, gloo)."""
import pytest

import dist_workers as W
from dist_harness import run_world
from nsa_dist.parallel.comm_stats import layer_traffic

# (world, kwargs): the layouts of issue 4, plus packed documents under Ulysses and TP > H = 1.
LAYOUTS = {
    "tp2": (2, dict(tp=2)),
    "tp4_h2": (4, dict(tp=4, num_heads=4, num_kv_heads=2)),
    "tp2_megatron_sp": (2, dict(tp=2, megatron_sp=True)),
    "ulysses2": (2, dict(sp=2)),
    "ulysses4_h2": (4, dict(sp=4, num_heads=4, num_kv_heads=2)),
    "tp2_x_ulysses2": (4, dict(tp=2, sp=2, num_heads=8, num_kv_heads=2)),
    "ulysses2_packed": (2, dict(sp=2, packed=True)),
    "tp4_h1_packed": (4, dict(tp=4, num_heads=4, num_kv_heads=1, packed=True)),
    # the other way to keep selection group-consistent (auto picks gather_q at these sizes)
    "tp4_h2_importance": (4, dict(tp=4, num_heads=4, num_kv_heads=2, selection_comm="importance")),
    "ulysses4_h2_importance": (4, dict(sp=4, num_heads=4, num_kv_heads=2, selection_comm="importance")),
    "tp2_x_ulysses2_importance": (4, dict(tp=2, sp=2, num_heads=8, num_kv_heads=2,
                                          selection_comm="importance")),
    "tp4_h1_packed_gather_q": (4, dict(tp=4, num_heads=4, num_kv_heads=1, packed=True,
                                       selection_comm="gather_q")),
    "ulysses4_h1_packed_gather_q": (4, dict(sp=4, num_heads=4, num_kv_heads=1, packed=True,
                                            selection_comm="gather_q")),
    # separate input projections (fused_projection=False) instead of one GEMM
    "tp2_x_ulysses2_unfused": (4, dict(tp=2, sp=2, num_heads=8, num_kv_heads=2, fused_projection=False)),
    # the dense baseline under the same layouts (model loss and gradients)
    "dense_tp4_h2": (4, dict(tp=4, num_heads=4, num_kv_heads=2, attention="dense")),
    "dense_tp2_x_ulysses2_packed": (4, dict(tp=2, sp=2, num_heads=8, num_kv_heads=2, packed=True,
                                            attention="dense")),
    "dense_tp2_megatron_sp": (2, dict(tp=2, megatron_sp=True, attention="dense")),
}


def _aggregate(rows, key):
    out = {}
    for r in rows:
        k = key(r)
        if k is not None:
            out[k] = out.get(k, 0) + r["payload_bytes"]
    return out


def _check_formula(rows, kw):
    """Recorded layer-0 traffic equals comm_stats.layer_traffic (fp32: 4-byte activations)."""
    cfg = W.tiny_config(kw.get("num_heads", 4), kw.get("num_kv_heads", 2))
    want = _aggregate(layer_traffic(cfg, 2, 64, kw.get("tp", 1), kw.get("sp", 1), kw.get("megatron_sp", False),
                                    act_bytes=4, param_bytes=4,
                                    selection_comm=kw.get("selection_comm", "auto")),
                      lambda r: (r["component"], r["op"], r["phase"]))
    got = _aggregate(rows, lambda r: (r["tag"][len("layers.0."):], r["op"], r["phase"])
                     if r["tag"].startswith("layers.0.") else None)
    assert got == want


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_device(name):
    world, kw = LAYOUTS[name]
    results = run_world(W.layout_worker, world, **kw)
    # The workers assert everything; here: every rank reports the same loss, close to one device.
    losses = {r["loss"] for r in results}
    assert len(losses) == 1, f"ranks disagree on the loss: {losses}"
    for r in results:
        assert r["loss_err"] < 1e-5 and r["model_grad_err"] < 1e-4
        if kw.get("attention", "nsa") == "nsa":
            assert r["layer_out_err"] < 1e-5 and r["layer_grad_err"] < 1e-4
    if not kw.get("packed") and kw.get("attention", "nsa") == "nsa":
        for r in results:
            _check_formula(r["comm"], kw)


def _bytes(rows, tag_suffix, op, phase):
    return sum(r["payload_bytes"] for r in rows
               if r["tag"].endswith(tag_suffix) and r["op"] == op and r["phase"] == phase)


def test_comm_stats_match_formulas():
    """TP=2 with Megatron SP, B=2, S=64, hidden 32, fp32: per layer the attention all-gathers
    x (B*S*hidden*4 bytes) and reduce-scatters y (same), forward; backward mirrors."""
    results = run_world(W.layout_worker, 2, tp=2, megatron_sp=True)
    rows = results[0]["comm"]
    act = 2 * 64 * 32 * 4
    for layer in (0, 1):
        assert _bytes(rows, f"layers.{layer}.attn.sp_gather", "all_gather", "fwd") == act
        assert _bytes(rows, f"layers.{layer}.attn.sp_reduce_scatter", "reduce_scatter", "fwd") == act
        assert _bytes(rows, f"layers.{layer}.attn.sp_gather", "reduce_scatter", "bwd") == act
    # no importance traffic when tp divides H
    assert not any("importance" in r["tag"] for r in rows)
    wire = {r["op"]: r["wire_bytes"] / r["payload_bytes"] for r in rows}
    assert wire["all_gather"] == pytest.approx(0.5) and wire["reduce_scatter"] == pytest.approx(0.5)


def test_importance_traffic_when_tp_exceeds_kv_heads():
    """TP=4 with H=2: every layer all-reduces float64 importance [B, S, 1, Ns] per rank."""
    results = run_world(W.layout_worker, 4, tp=4, num_heads=4, num_kv_heads=2, selection_comm="importance")
    rows = results[0]["comm"]
    imp = [r for r in rows if r["tag"].endswith("attn.importance")]
    assert imp, "no importance all-reduce recorded"
    B, S, Ns = 2, 64, 64 // 8
    assert all(r["payload_bytes"] == B * S * Ns * 8 for r in imp)

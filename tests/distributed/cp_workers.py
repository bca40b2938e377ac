"""Per-rank bodies of the context-parallel tests: a CP layout (alone or with TP / Ulysses)
against one device, in float64, computed by every rank in the same process.

Asserted on each rank: the layer's output and input gradient on its zigzag shard, every
parameter gradient (summed over the sequence ranks, gathered to full shape), the selected
blocks of its query rows (identical), the model's loss, every model gradient, the gradient
norm, the layer-0 selection in the model's stats, and the recorded traffic of layer 0
against ``comm_stats.layer_traffic``.
"""
from __future__ import annotations

import copy

import torch

from dist_workers import build_model, one_device_layer, sharded_layer, tiny_config
from nsa_dist.parallel import (CommStats, ParallelState, gather_full, grad_norm, parallelize, parallelize_attention,
                               sync_grads)
from nsa_dist.parallel import collectives as C
from nsa_dist.parallel.comm_stats import layer_traffic, payload_by
from nsa_dist.parallel.context import zigzag_shard

TOL = dict(rtol=0, atol=1e-10)
S = 64


def documents(S: int) -> torch.Tensor:
    """Document bounds that cross the zigzag chunk boundaries of cp = 2 and 4 (chunks of 16
    and 8 positions): one shorter than a compression block (8), one long enough (6 selection
    blocks) that some blocks are chosen by importance, not forced."""
    return torch.tensor([0, 7, 52, S], dtype=torch.int32)


def _rows(t: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """The query rows this rank attends: its zigzag shard."""
    return zigzag_shard(t, 1, state.cp, state.cp_rank)


def _tokens(t: torch.Tensor, state: ParallelState, megatron_sp: bool = False) -> torch.Tensor:
    """The tokens this rank holds between layers: its Ulysses (or Megatron SP: TP) part of its
    zigzag shard."""
    return C.local_chunk(_rows(t, state), 1, state.tp_group if megatron_sp else state.sp_group)


def _assert_grads(par: dict, full: dict, where: str, tol: dict = TOL) -> float:
    assert set(par) == set(full), f"{where}: parameter names differ: {sorted(set(par) ^ set(full))}"
    for k in full:
        torch.testing.assert_close(par[k], full[k], **tol, msg=lambda m: f"{where} grad {k}: {m}")
        assert full[k].abs().max() > 0, f"{where}: gradient of {k} is zero; the test checks nothing"
    return max(float((par[k] - full[k]).abs().max()) for k in full)


def layer_check(state: ParallelState, model, cu, selection_comm: str, megatron_sp: bool = False,
                tol: dict = TOL) -> dict:
    attn = model.layers[0].attn
    hidden = model.config.hidden_size
    B = 1 if cu is not None else 2
    g = torch.Generator().manual_seed(1)
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    x = torch.randn(B, S, hidden, generator=g, dtype=torch.float64).to(dev, dtype)
    w_out = torch.randn(B, S, hidden, generator=g, dtype=torch.float64).to(dev, dtype)
    pattn = parallelize_attention(copy.deepcopy(attn), state, megatron_sp, selection_comm=selection_comm)

    y_full, dx_full, idx_full, full_grads = one_device_layer(attn, x, w_out, cu)

    y, idx = sharded_layer(pattn, x, w_out, cu, lambda t: _tokens(t, state, megatron_sp), y_full, dx_full, tol)
    for p in pattn.parameters():  # each sequence rank holds its tokens' part of a gradient
        C.all_reduce_(p.grad, state.seq_group)
    err = _assert_grads(gather_full(pattn, state, "grad"), full_grads, "layer", tol)

    L = pattn.comm.layout
    want = _rows(idx_full, state)[:, :, L.kv_global_start:L.kv_global_start + L.kv_local]
    assert idx.shape == want.shape, (idx.shape, want.shape)
    assert torch.equal(idx, want), "selected blocks differ from one device"
    assert (idx_full >= 0).sum(-1).max() == model.config.nsa.num_selected  # chosen by importance too
    return {"layer_out_err": float((y.detach() - _tokens(y_full, state, megatron_sp)).abs().max()),
            "layer_grad_err": err}


def model_check(state: ParallelState, model, cu, selection_comm: str, megatron_sp: bool = False) -> dict:
    cfg = model.config
    B = 1 if cu is not None else 2
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g).to(next(model.parameters()).device)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    labels[:, 5] = -100
    model.zero_grad(set_to_none=True)
    out = model(ids, labels, cu_seqlens=cu, return_stats=True)
    out.loss.backward()
    full_grads = {n: p.grad for n, p in model.named_parameters()}

    stats = CommStats()
    pm = parallelize(model, state, megatron_sp, comm_stats=stats, selection_comm=selection_comm)
    pout = pm(ids, labels, cu_seqlens=cu, return_stats=True)
    torch.testing.assert_close(pout.loss, out.loss, **TOL)
    assert pout.logits.shape == (B, S // (state.cp * state.sp), cfg.vocab_size // state.tp)
    pout.loss.backward()
    sync_grads(pm, state)
    err = _assert_grads(gather_full(pm, state, "grad"), full_grads, "model")
    full_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in full_grads.values()]))
    torch.testing.assert_close(grad_norm(pm, state), full_norm.float(), rtol=1e-6, atol=0)
    for layer, (ps_, fs) in enumerate(zip(pout.stats, out.stats)):
        if pm.layers[layer].attn.comm.layout.kv_global_start == 0:
            # the statistics cover every query (the CP shards gathered): as on one device
            assert torch.equal(ps_.selected_blocks, fs.selected_blocks), f"layer {layer} selection differs"
            assert torch.equal(ps_.tokens_read, fs.tokens_read)
            if state.tp * state.sp == 1:  # all heads on this rank: the same gate statistics
                torch.testing.assert_close(ps_.gate_mean, fs.gate_mean, **TOL)
    if cu is None:  # recorded traffic of layer 0 = the formula (fp64: 8-byte activations)
        want = payload_by(layer_traffic(cfg, B, S, state.tp, state.sp, megatron_sp, act_bytes=8, param_bytes=8,
                                        selection_comm=selection_comm, cp=state.cp),
                          lambda r: (r["component"], r["op"], r["phase"]))
        got = payload_by(stats.rows(), lambda r: (r["tag"][len("layers.0."):], r["op"], r["phase"])
                         if r["tag"].startswith("layers.0.") else None)
        assert got == want, (got, want)
        assert ("attn.cp_kv", "all_gather", "fwd") in got
    return {"loss": pout.loss.item(), "loss_err": abs(pout.loss.item() - out.loss.item()), "model_grad_err": err}


def cp_worker(rank: int, world: int, cp: int = 2, tp: int = 1, sp: int = 1, num_heads: int = 4,
              num_kv_heads: int = 2, packed: bool = False, selection_comm: str = "auto",
              megatron_sp: bool = False, device: str = "cpu") -> dict:
    """``device="cuda"``: the same checks on GPUs (run_world(..., dist_backend="nccl"); the
    reference backend, fp64)."""
    state = ParallelState(world, rank, tp=tp, sp=sp, cp=cp)
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    model = build_model(tiny_config(num_heads, num_kv_heads), device=device).double()
    cu = documents(S) if packed else None
    out = layer_check(state, model, cu, selection_comm, megatron_sp)
    out.update(model_check(state, model, cu, selection_comm, megatron_sp))
    return out


def cp_triton_worker(rank: int, world: int, cp: int = 2, tp: int = 1, packed: bool = False,
                     num_kv_heads: int = 2, selection_comm: str = "auto", device: str = "cpu") -> dict:
    """One NSA layer under CP with the Triton kernels (the CPU interpreter, or ``device="cuda"``
    over NCCL: fp32) against the same layer on one device with the same kernels: output, input
    and weight gradients within fp32 rounding, the selected blocks identical."""
    state = ParallelState(world, rank, tp=tp, cp=cp)
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    model = build_model(tiny_config(num_kv_heads=num_kv_heads, layers=1), device=device, backend="triton").float()
    cu = documents(S) if packed else None
    return layer_check(state, model, cu, selection_comm, tol=dict(rtol=1e-4, atol=1e-5))


def cp_dp_worker(rank: int, world: int, cp: int = 2, recompute: str = "full", loss_chunk: int = 0) -> dict:
    """Data parallel on top of CP: each replica its own packed batch; activation checkpointing
    on (``recompute``), the loss optionally in chunks; after ``sync_grads`` every rank holds the
    gradient of the mean loss over the replicas' batches (fp64, 1e-10)."""
    state = ParallelState(world, rank, cp=cp)
    cfg = tiny_config()
    model = build_model(cfg).double()
    model.config.recompute = recompute
    g = torch.Generator().manual_seed(4)
    batches = torch.randint(0, cfg.vocab_size, (state.dp, 1, S), generator=g)
    cu = documents(S)
    ref_losses = []
    for ids in batches:
        loss = model(ids, torch.roll(ids, -1, 1), cu_seqlens=cu).loss / state.dp
        loss.backward()
        ref_losses.append(float(loss) * state.dp)
    full = {n: p.grad for n, p in model.named_parameters()}
    pm = parallelize(model, state)
    pm.gradient_checkpointing, pm.loss_chunk = True, loss_chunk
    pm.train()
    ids = batches[state.dp_rank]
    out = pm(ids, torch.roll(ids, -1, 1), cu_seqlens=cu)
    assert (out.logits is None) == (loss_chunk > 0)
    out.loss.backward()
    assert abs(float(out.loss) - ref_losses[state.dp_rank]) < 1e-12
    sync_grads(pm, state)
    return {"grad_err": _assert_grads(gather_full(pm, state, "grad"), full, "cp x dp")}

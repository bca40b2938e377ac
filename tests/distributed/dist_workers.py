"""Per-rank bodies of the distributed tests: compare a layout with one device.

Every rank builds the same full model from a seed, computes the single-device reference
itself, then the parallel version, and asserts: layer output, input gradient, every
parameter gradient (gathered to full shape), selected block indices, model loss and
every model gradient.
"""
from __future__ import annotations

import copy

import torch

from nsa_dist import ModelConfig, NSAConfig
from nsa_dist.checkpoint.layout import local_layout
from nsa_dist.models import NSADecoderLM
from nsa_dist.modules.attention import NSAAttention
from nsa_dist.modules.rope import token_positions
from nsa_dist.parallel import (CommStats, ParallelNSAAttention, ParallelState, gather_full,
                               grad_norm, parallelize, sync_grads)
from nsa_dist.parallel import collectives as C

TOL = dict(rtol=1e-4, atol=2e-5)


def tiny_config(num_heads=4, num_kv_heads=2, vocab=64, layers=2, tie=True, attention="nsa",
                fused_projection=True) -> ModelConfig:
    nsa = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=5, window=16, phi="mlp",
                    phi_hidden=16, gate_hidden=16)
    return ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=layers, num_heads=num_heads,
                       num_kv_heads=num_kv_heads, head_dim=8, intermediate_size=64, max_seq_len=256,
                       tie_embeddings=tie, init_std=0.1, nsa=nsa, attention=attention,
                       fused_projection=fused_projection)


def build_model(cfg: ModelConfig, seed: int = 0, device: str = "cpu", backend: str = "reference") -> NSADecoderLM:
    torch.manual_seed(seed)
    model = NSADecoderLM(cfg, backend=backend).to(device)
    with torch.no_grad():  # zero-initialised parts (gate and phi outputs) get values, so
        for p in model.parameters():  # every gradient path is exercised
            if p.abs().max() == 0:
                p.normal_(0.0, 0.1)
    return model


def _shard_seq(t: torch.Tensor, state: ParallelState, megatron_sp: bool) -> torch.Tensor:
    if megatron_sp:
        return t.chunk(state.tp, dim=1)[state.tp_rank]
    if state.sp > 1:
        return t.chunk(state.sp, dim=1)[state.sp_rank]
    return t


def _max_err(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _assert_grads(par: dict, full: dict, where: str) -> float:
    missing = set(full) ^ set(par)
    assert not missing, f"{where}: parameter names differ: {sorted(missing)}"
    for k in full:
        torch.testing.assert_close(par[k], full[k], **TOL, msg=lambda m: f"{where} grad {k}: {m}")
        assert full[k].abs().max() > 0, f"{where}: gradient of {k} is zero; the test checks nothing"
    return _max_err(par, full)


def one_device_layer(attn: NSAAttention, x: torch.Tensor, w_out: torch.Tensor, cu) -> tuple:
    """The single-device side of a layer check, loss sum(y * w_out): (y, dx, the selection,
    parameter gradients by name)."""
    x_full = x.clone().requires_grad_()
    y_full, _ = attn(x_full, cu_seqlens=cu)
    (y_full * w_out).sum().backward()
    with torch.no_grad():
        pos = token_positions(x.shape[1], x.device, cu, None)
        _, idx_full = attn.attend(attn.project(x, pos, cu), cu)
    return y_full.detach(), x_full.grad, idx_full, {n: p.grad for n, p in attn.named_parameters()}


def sharded_layer(pattn, x, w_out, cu, shard, y_full, dx_full, tol: dict) -> tuple:
    """The parallel side of a layer check: ``shard(x)`` (this rank's tokens) through ``pattn``,
    its output and input gradient asserted equal to one device's shard. Returns (y, indices)."""
    x_in = shard(x).clone().requires_grad_()
    y, idx = pattn(x_in, cu_seqlens=cu, return_indices=True)
    torch.testing.assert_close(y, shard(y_full), **tol)
    (y * shard(w_out)).sum().backward()
    torch.testing.assert_close(x_in.grad, shard(dx_full), **tol)
    return y, idx


def layer_check(state: ParallelState, model: NSADecoderLM, megatron_sp: bool, packed: bool,
                S: int, selection_comm: str = "auto") -> dict:
    """One NSA layer: output, dx, parameter gradients, selected indices."""
    attn: NSAAttention = model.layers[0].attn
    cfg = model.config
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(1)
    B = 1 if packed else 2
    cu = torch.tensor([0, 20, S], dtype=torch.int32, device=dev) if packed else None
    x = torch.randn(B, S, cfg.hidden_size, generator=g).to(dev)
    w_out = torch.randn(B, S, cfg.hidden_size, generator=g).to(dev)
    pattn = ParallelNSAAttention(copy.deepcopy(attn), state, megatron_sp, selection_comm=selection_comm)

    y_full, dx_full, idx_full, full_grads = one_device_layer(attn, x, w_out, cu)

    y, idx = sharded_layer(pattn, x, w_out, cu, lambda t: _shard_seq(t, state, megatron_sp), y_full, dx_full, TOL)
    for p in pattn.parameters():  # Ulysses ranks hold their shard's part of each gradient
        C.all_reduce_(p.grad, state.sp_group)
    par_grads = gather_full(pattn, state, "grad")
    err = _assert_grads(par_grads, full_grads, "layer")
    params = gather_full(pattn, state, "param")
    for n, p in attn.named_parameters():
        assert torch.equal(params[n], p.detach()), f"parameter {n} differs from the full model"

    L = pattn.comm.layout
    want = idx_full[:, :, L.kv_global_start:L.kv_global_start + L.kv_local]
    assert idx.shape == want.shape, (idx.shape, want.shape)
    assert torch.equal(idx, want), "selected blocks differ from one device"
    # the selection is not trivial: some query picks a non-forced block
    assert (idx_full >= 0).sum() > 0
    return {"layer_out_err": float((y.detach() - _shard_seq(y_full, state, megatron_sp)).abs().max()),
            "layer_grad_err": err}


def model_check(state: ParallelState, model: NSADecoderLM, megatron_sp: bool, packed: bool,
                S: int, selection_comm: str = "auto") -> dict:
    """Whole model: loss and every parameter gradient; communication recorded."""
    cfg = model.config
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(2)
    B = 1 if packed else 2
    cu = torch.tensor([0, 24, S], dtype=torch.int32, device=dev) if packed else None
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g).to(dev)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    labels[:, 5] = -100
    model.zero_grad(set_to_none=True)
    out = model(ids, labels, cu_seqlens=cu, return_stats=cfg.attention == "nsa")
    out.loss.backward()
    full_grads = {n: p.grad for n, p in model.named_parameters()}

    stats = CommStats()
    names = [n for n, _ in model.named_parameters()]
    pm = parallelize(model, state, megatron_sp=megatron_sp, comm_stats=stats, selection_comm=selection_comm)
    # sharded in place: the single-device names, in the single-device order, each its own layout name
    assert [n for n, _ in pm.named_parameters()] == names, "parameter names or order changed"
    assert all(full == local for local, (full, *_) in local_layout(pm).items())
    pout = pm(ids, labels, cu_seqlens=cu, return_stats=cfg.attention == "nsa")
    torch.testing.assert_close(pout.loss, out.loss, **TOL)
    assert pout.logits.shape == (B, S // state.sp, cfg.vocab_size // state.tp)
    pout.loss.backward()
    sync_grads(pm, state)
    err = _assert_grads(gather_full(pm, state, "grad"), full_grads, "model")
    full_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in full_grads.values()]))
    torch.testing.assert_close(grad_norm(pm, state), full_norm, rtol=1e-5, atol=1e-6)
    # Layer-0 selection of KV head 0, on the ranks that attend it.
    for layer, (ps_, fs) in enumerate(zip(pout.stats or [], out.stats or [])):
        if pm.layers[layer].attn.comm.layout.kv_global_start == 0:
            assert torch.equal(ps_.selected_blocks, fs.selected_blocks), f"layer {layer} selection differs"
    return {"loss": pout.loss.item(), "loss_full": out.loss.item(),
            "loss_err": abs(pout.loss.item() - out.loss.item()), "model_grad_err": err,
            "comm": stats.rows()}


def layout_worker(rank: int, world: int, tp: int = 1, sp: int = 1, megatron_sp: bool = False,
                  num_heads: int = 4, num_kv_heads: int = 2, packed: bool = False, S: int = 64,
                  selection_comm: str = "auto", device: str = "cpu", backend: str = "reference",
                  attention: str = "nsa", fused_projection: bool = True) -> dict:
    state = ParallelState(world, rank, tp=tp, sp=sp)
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    model = build_model(tiny_config(num_heads, num_kv_heads, attention=attention,
                                    fused_projection=fused_projection), device=device, backend=backend)
    out = layer_check(state, model, megatron_sp, packed, S, selection_comm) if attention == "nsa" else {}
    out.update(model_check(state, model, megatron_sp, packed, S, selection_comm))
    return out


def train_worker(rank: int, world: int, tp: int = 2, steps: int = 20, S: int = 64) -> dict:
    """``steps`` AdamW steps on one device and under TP, same data: the loss curves."""
    state = ParallelState(world, rank, tp=tp)
    cfg = tiny_config(tie=False)
    ref = build_model(cfg)
    pm = parallelize(copy.deepcopy(ref), state)  # in place: keep ref whole
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.01)
    opt_par = torch.optim.AdamW(pm.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(3)
    # A learnable stream: a few fixed sequences, repeated.
    data = torch.randint(0, cfg.vocab_size, (4, 2, S), generator=g)
    ref_curve, par_curve = [], []
    for step in range(steps):
        ids = data[step % 4]
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = -100
        for m, opt, curve in ((ref, opt_ref, ref_curve), (pm, opt_par, par_curve)):
            opt.zero_grad(set_to_none=True)
            loss = m(ids, labels).loss
            loss.backward()
            opt.step()
            curve.append(float(loss))
    return {"ref": ref_curve, "par": par_curve}


def dp_worker(rank: int, world: int, tp: int = 2, sp: int = 1, S: int = 64, recompute: str = "full",
              megatron_sp: bool = False) -> dict:
    """Data parallel on top of TP (and Ulysses): each replica its own batch; after
    ``sync_grads`` every rank holds the gradient of the mean loss over the replicas' batches.
    Activation checkpointing on (``recompute`` mode), to cover recomputation with collectives inside."""
    state = ParallelState(world, rank, tp=tp, sp=sp)
    cfg = tiny_config(num_heads=4, num_kv_heads=2)
    model = build_model(cfg)
    model.config.recompute = recompute
    g = torch.Generator().manual_seed(4)
    batches = torch.randint(0, cfg.vocab_size, (state.dp, 1, S), generator=g)
    ref_losses = []
    for ids in batches:
        loss = model(ids, torch.roll(ids, -1, 1)).loss / state.dp
        loss.backward()
        ref_losses.append(float(loss) * state.dp)
    full = {n: p.grad for n, p in model.named_parameters()}
    pm = parallelize(model, state, megatron_sp=megatron_sp)
    pm.gradient_checkpointing = True
    pm.train()
    ids = batches[state.dp_rank]
    loss = pm(ids, torch.roll(ids, -1, 1)).loss
    loss.backward()
    torch.testing.assert_close(float(loss), ref_losses[state.dp_rank], rtol=1e-5, atol=1e-6)
    sync_grads(pm, state)
    return {"grad_err": _assert_grads(gather_full(pm, state, "grad"), full, "dp")}


def chunked_loss_worker(rank: int, world: int, tp: int = 1, sp: int = 1, chunk: int = 24, S: int = 64) -> dict:
    """The parallel LM with the loss in chunks of ``chunk`` positions (no full logits) against
    one device's unchunked loss: loss and every gradient."""
    state = ParallelState(world, rank, tp=tp, sp=sp)
    model = build_model(tiny_config(num_heads=4, num_kv_heads=2, tie=False))
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, model.config.vocab_size, (2, S), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[0, 7] = -100
    out = model(ids, labels)
    out.loss.backward()
    full = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.loss_chunk = chunk
    pm = parallelize(model, state)
    pout = pm(ids, labels)
    assert pout.logits is None
    torch.testing.assert_close(pout.loss, out.loss, **TOL)
    pout.loss.backward()
    sync_grads(pm, state)
    return {"loss_err": abs(float(pout.loss) - float(out.loss)),
            "grad_err": _assert_grads(gather_full(pm, state, "grad"), full, "chunked loss")}

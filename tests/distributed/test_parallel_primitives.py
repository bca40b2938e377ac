"""Collectives, TP linears (sharded in place, inside a region), vocab-parallel embedding and
cross-entropy on 2 processes against single-device PyTorch (values and gradients)."""
import copy

import torch
from torch import nn

from dist_harness import run_world
from nsa_dist.parallel import (CommStats, ParallelState, TPRegion, shard_columnwise_, shard_param,
                               shard_rowwise_, vocab_parallel_cross_entropy, vocab_parallel_embedding,
                               wire_bytes)
from nsa_dist.parallel import collectives as C

TOL = dict(rtol=1e-5, atol=1e-6)


def _mlp_check(state, sequence_parallel: bool):
    torch.manual_seed(0)
    up, down = nn.Linear(8, 12), nn.Linear(12, 8)
    x = torch.randn(2, 6, 8)
    w = torch.randn(2, 6, 8)
    xf = x.clone().requires_grad_()
    (down(torch.relu(up(xf))) * w).sum().backward()
    r, t, g = state.tp_rank, state.tp, state.tp_group
    per = 12 // t
    col = shard_columnwise_(copy.deepcopy(up), r * per, (r + 1) * per)
    row = copy.deepcopy(down)
    bias = row.bias  # a row-parallel linear has no bias of its own: it is added after the sum
    row.bias = None
    shard_rowwise_(row, r * per, (r + 1) * per)
    region = TPRegion(g, megatron_sp=sequence_parallel)
    xin = (x.chunk(t, 1)[r] if sequence_parallel else x).clone().requires_grad_()
    y = region.exit(row(torch.relu(col(region.enter(xin))))) + bias
    wl = w.chunk(t, 1)[r] if sequence_parallel else w
    (y * wl).sum().backward()
    yf = down(torch.relu(up(x))).detach()
    torch.testing.assert_close(y, yf.chunk(t, 1)[r] if sequence_parallel else yf, **TOL)
    torch.testing.assert_close(xin.grad, xf.grad.chunk(t, 1)[r] if sequence_parallel else xf.grad, **TOL)
    torch.testing.assert_close(col.weight.grad, up.weight.grad[r * per:(r + 1) * per], **TOL)
    torch.testing.assert_close(col.bias.grad, up.bias.grad[r * per:(r + 1) * per], **TOL)
    torch.testing.assert_close(row.weight.grad, down.weight.grad[:, r * per:(r + 1) * per], **TOL)
    if not sequence_parallel:  # with SP the bias sees only this rank's positions
        torch.testing.assert_close(bias.grad, down.bias.grad, **TOL)


def primitives_worker(rank, world):
    state = ParallelState(world, rank, tp=world)
    g, r, t = state.tp_group, state.tp_rank, state.tp
    _mlp_check(state, False)
    _mlp_check(state, True)

    # vocab-parallel embedding (both output modes) and cross-entropy
    torch.manual_seed(1)
    emb = nn.Embedding(10, 4)
    ids = torch.tensor([[0, 9, 4, 5], [7, 2, 1, 8]])
    w_local = shard_param(emb.weight, 0, r * 5, (r + 1) * 5)
    out = vocab_parallel_embedding(ids, w_local, r * 5, g)
    torch.testing.assert_close(out, emb(ids), **TOL)
    (out * torch.arange(4.0)).sum().backward()
    (emb(ids) * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(w_local.grad, emb.weight.grad[r * 5:(r + 1) * 5], **TOL)
    torch.testing.assert_close(vocab_parallel_embedding(ids, w_local, r * 5, g, "reduce_scatter_seq"),
                               emb(ids).chunk(t, 1)[r], **TOL)

    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 9, 4, -100, 5, 6])
    lf = logits.clone().requires_grad_()
    ref = nn.functional.cross_entropy(lf, target, ignore_index=-100, reduction="none")
    ref.sum().backward()
    ll = logits[:, r * 5:(r + 1) * 5].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(ll, target, r * 5, g)
    torch.testing.assert_close(loss, ref.detach(), **TOL)
    assert loss[3] == 0
    loss.sum().backward()
    torch.testing.assert_close(ll.grad, lf.grad[:, r * 5:(r + 1) * 5], **TOL)

    # all-to-all: [B, S/p, heads, D] -> [B, S, heads/p, D], gradient = reverse all-to-all
    full = torch.arange(2 * 8 * 4 * 3, dtype=torch.float32).view(2, 8, 4, 3)
    shard = full.chunk(t, 1)[r].clone().requires_grad_()
    stats = CommStats()
    heads = C.all_to_all(shard, 2, 1, g, stats.meter("a2a"))
    assert torch.equal(heads, full.chunk(t, 2)[r])
    (heads * 2).sum().backward()
    assert torch.equal(shard.grad, torch.full_like(shard, 2.0))
    rows = {r["phase"]: r for r in stats.rows()}
    assert rows["fwd"]["payload_bytes"] == rows["bwd"]["payload_bytes"] == shard.numel() * 4

    # gather_no_reduce / split_along are inverse; copy_to_region sums gradients
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3)).requires_grad_()
    y = C.split_along(C.gather_no_reduce(x, 0, g), 0, g)
    assert torch.equal(y, x)
    z = C.copy_to_region(x, g)
    (z * (rank + 1)).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, float(sum(range(1, t + 1)))))
    return {"ok": True}


def test_primitives_match_single_device():
    assert all(r["ok"] for r in run_world(primitives_worker, 2))


def test_wire_bytes_formulas():
    assert wire_bytes("all_reduce", 100, 4) == 150
    assert wire_bytes("all_gather", 100, 4) == 75
    assert wire_bytes("all_to_all", 100, 2) == 50
    assert wire_bytes("all_reduce", 100, 1) == 0

"""``recompute: keep_attention`` with the Triton kernels: the whole block is recomputed in the
backward but the attention is not (``forward_memo`` keeps the branches' outputs and
log-sum-exps), so its kept bytes are the results alone; loss and gradients equal recomputing
nothing. Through Triton's interpreter on the CPU (fp32, small shapes)."""
import pytest
import torch

from nsa_dist import ModelConfig, NSAConfig, ops
from nsa_dist.kernels.launch import LaunchConfig
from nsa_dist.models import NSADecoderLM
from nsa_inputs import args, random_nsa_inputs

from _interp import kernels_or_skip

CFG = ModelConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  intermediate_size=128, max_seq_len=128,
                  nsa=NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=3, window=16, phi="mlp"))


def _count(monkeypatch, name: str) -> list:
    """Calls of ``nsa_dist.kernels.nsa.<name>``: "_sel_forward" (the selected branch's forward,
    once per NSA forward that runs the kernels), "combine" (the gates, once per NSAFunction call)."""
    from nsa_dist.kernels import nsa as knsa

    calls = []
    real = getattr(knsa, name)

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(knsa, name, counted)
    return calls


def _twin_models(recompute: str) -> tuple:
    """(a model with ``recompute``, one with "none" and the same weights (the zero-initialised
    ones drawn, so every gradient is nonzero), token ids [1, 64], two documents' bounds)."""
    torch.manual_seed(0)
    m = NSADecoderLM(ModelConfig(**{**CFG.to_dict(), "recompute": recompute}), backend="triton")
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().max() == 0:
                p.normal_(0.0, 0.1)
    plain = NSADecoderLM(ModelConfig(**{**CFG.to_dict(), "recompute": "none"}), backend="triton")
    plain.load_state_dict(m.state_dict())
    ids = torch.randint(0, CFG.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    return m, plain, ids, torch.tensor([0, 24, 64], dtype=torch.int32)


def test_forward_memo_skips_the_kernels_and_gives_the_same_gradients(monkeypatch):
    """A second call with the first call's memo and indices runs no attention kernel, returns the
    same output, and its backward gives the gradients of a plain call."""
    kernels_or_skip()
    calls = _count(monkeypatch, "_sel_forward")
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=3, window=16)
    x = random_nsa_inputs(cfg, B=1, S=64, HQ=4, H=2, Dk=16, Dv=16, dtype=torch.float32, seed=3,
                          requires_grad=True)
    memo = {}
    o1, idx = ops.nsa_attention(*args(x), cfg, backend="triton", return_indices=True, forward_memo=memo)
    assert len(calls) == 1 and "branches" in memo
    do = torch.randn_like(o1)
    want = torch.autograd.grad(o1, args(x), do)
    o2 = ops.nsa_attention(*args(x), cfg, backend="triton", block_indices=idx, canonical_indices=True,
                           forward_memo=memo)
    assert len(calls) == 1, "the recomputation ran the attention kernels"
    torch.testing.assert_close(o2, o1, rtol=0, atol=0)
    for g, w in zip(torch.autograd.grad(o2, args(x), do), want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="block_indices"):
        ops.nsa_attention(*args(x), cfg, backend="triton", forward_memo=memo)


def test_kept_attention_recomputes_no_attention_and_equals_no_recomputation(monkeypatch):
    """Model level: keep_attention on the kernels runs the NSA forward once per layer (none in
    the backward's recomputation), keeps fewer bytes than the reference's split (which also
    keeps the function's inputs), and gives the loss and gradients of recompute "none"."""
    kernels_or_skip()
    kept, plain, ids, cu = _twin_models("keep_attention")
    out = []
    calls, combines = _count(monkeypatch, "_sel_forward"), _count(monkeypatch, "combine")
    for m, calls_per_layer in ((kept, 2), (plain, 1)):
        m.gradient_checkpointing = True
        m.train()
        calls.clear()
        combines.clear()
        o = m(ids, torch.roll(ids, -1, 1), cu_seqlens=cu)
        o.loss.backward()
        assert len(calls) == CFG.num_layers, f"{len(calls)} NSA forwards for {CFG.num_layers} layers"
        # kept: the function is called again in the block's recomputation (from the memo), which
        # runs the separate gate combination; a first call runs it only without ``gate_fused``
        fused = int(LaunchConfig().gate_fused)
        assert len(combines) == (calls_per_layer - fused) * CFG.num_layers, len(combines)
        out.append((o.loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (la, ga), (lb, gb) = out
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-5, msg=n)
        assert gb[n].abs().max() > 0, n
    attn = kept.layers[0].attn
    assert attn.keeps_outputs(torch.device("cpu"), torch.float32)
    small = attn.kept_bytes(1, 1000, torch.bfloat16, torch.device("cpu"))
    assert small == 1000 * (2 * 3 * 4 * 16 + 4 * 3 * 4 + 15 * 2 * 3)
    assert small < attn.kept_bytes(1, 1000, torch.bfloat16) / 1.5  # the reference's split


def test_min_recompute_with_the_kernels_equals_no_recomputation():
    """recompute "min" on the kernels: the probe forward (``activation_bytes``) runs the NSA
    kernels and counts more than the attention's kept results; with a budget for every layer's
    kept results and one layer's activations the plan keeps the first layer's attention and
    recomputes nothing in the last; loss and gradients equal recompute "none"."""
    kernels_or_skip()
    from nsa_dist.models.decoder import activation_bytes

    m, plain, ids, cu = _twin_models("min")
    kept = m.layers[-1].attn.kept_bytes(1, 64, torch.float32)
    act = activation_bytes(m.layers[-1], m.embed(ids), cu, None)
    assert act > 2 * kept
    m.recompute_budget = CFG.num_layers * kept + (act - kept)
    out = []
    for model in (m, plain):
        model.gradient_checkpointing = True
        model.train()
        o = model(ids, torch.roll(ids, -1, 1), cu_seqlens=cu)
        o.loss.backward()
        out.append((o.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plan,) = m._recompute_plans.values()
    assert plan == ["keep_attention"] * (CFG.num_layers - 1) + ["none"], plan
    (la, ga), (lb, gb) = out
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-5, msg=n)
        assert gb[n].abs().max() > 0, n

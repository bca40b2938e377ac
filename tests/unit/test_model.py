"""The decoder LM: training signal, FLOP counting, dense baseline, errors."""
import pytest
import torch

from nsa_dist import ModelConfig, NSAConfig
from nsa_dist.models import NSADecoderLM, attended_keys_per_query

TINY = ModelConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   intermediate_size=128, max_seq_len=128,
                   nsa=NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=4, window=16, phi="mlp"))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = NSADecoderLM(TINY, backend="reference")
    x = torch.randint(0, 97, (2, 64))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = model(x, labels=y).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_stats_per_layer_and_ignore_index():
    model = NSADecoderLM(TINY, backend="reference")
    x = torch.randint(0, 97, (1, 40))
    labels = torch.full_like(x, -100)
    labels[0, 5] = 3
    out = model(x, labels=labels, return_stats=True)
    assert len(out.stats) == 2 and out.logits.shape == (1, 40, 97)
    expect = torch.nn.functional.cross_entropy(out.logits[0, 5:6].float(), torch.tensor([3]))
    assert torch.isclose(out.loss, expect)


def test_tied_and_untied_embeddings():
    tied = NSADecoderLM(TINY)
    assert tied.lm_head.weight is tied.embed.weight
    untied = NSADecoderLM(ModelConfig(**{**TINY.to_dict(), "tie_embeddings": False}))
    assert untied.num_parameters() == tied.num_parameters() + 97 * 64


def test_zero_init_layers_survive_model_init():
    model = NSADecoderLM(TINY)
    attn = model.layers[0].attn
    assert attn.gate.fc2.weight.abs().sum() == 0 and attn.phi_k.fc2.weight.abs().sum() == 0
    assert attn.q_proj.weight.std() > 0.01


def test_flops_count_nsa_sparse_and_dense():
    cfg = ModelConfig(num_layers=1, hidden_size=256, num_heads=4, num_kv_heads=1, head_dim=64,
                      nsa=NSAConfig(window=512))
    keys = attended_keys_per_query(65536, cfg)
    # Long sequences: sel saturates near n*l' (the current block is partial), win at 512, cmp grows ~ S / (2d).
    assert 960 < keys["sel"] <= 1024 and 510 < keys["win"] <= 512 and 2000 < keys["cmp"] < 2100
    dense = ModelConfig(**{**cfg.to_dict(), "attention": "dense"})
    assert attended_keys_per_query(65536, dense)["dense"] == pytest.approx(32768.5)
    nsa_model, dense_model = NSADecoderLM(cfg), NSADecoderLM(dense)
    assert nsa_model.flops_per_token(65536) < dense_model.flops_per_token(65536)
    assert nsa_model.flops_per_token(64) > 6 * dense_model.matmul_parameters()
    # the block scoring (q.k over the visible compressed keys, forward only) is counted once
    from nsa_dist.models import attention_flops_per_token, selection_flops_per_token
    sel = selection_flops_per_token(65536, cfg)
    assert sel == pytest.approx(2 * 4 * 64 * keys["cmp"])
    assert selection_flops_per_token(65536, dense) == 0.0
    assert nsa_model.flops_per_token(65536) == pytest.approx(
        6 * nsa_model.matmul_parameters() + 3 * attention_flops_per_token(65536, cfg) + sel)


def test_dense_attention_variant_trains_and_respects_documents():
    cfg = ModelConfig(**{**TINY.to_dict(), "attention": "dense"})
    model = NSADecoderLM(cfg)
    x = torch.randint(0, 97, (1, 30))
    cu = torch.tensor([0, 12, 30], dtype=torch.int32)
    packed = model(x, cu_seqlens=cu).logits
    second = model(x[:, 12:]).logits
    assert torch.allclose(packed[:, 12:], second, atol=1e-5)


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = NSADecoderLM(TINY, backend="reference")
    b = NSADecoderLM(TINY, backend="reference")
    b.load_state_dict(a.state_dict())
    b.gradient_checkpointing = True
    x = torch.randint(0, 97, (1, 48))
    for m in (a, b):
        m(x, labels=x).loss.backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_bad_model_inputs():
    model = NSADecoderLM(TINY)
    with pytest.raises(ValueError, match=r"input_ids must be \[B, S\]"):
        model(torch.randint(0, 97, (40,)))
    with pytest.raises(TypeError, match="integer"):
        model(torch.rand(1, 40))
    with pytest.raises(ValueError, match="labels shape"):
        model(torch.randint(0, 97, (1, 40)), labels=torch.zeros(1, 39, dtype=torch.long))


def test_chunked_loss_equals_full_loss_and_gradients():
    """model.loss_chunk: the loss a few positions at a time (checkpointed) gives the same loss
    and gradients as full logits, with -100 labels and a chunk that does not divide B*S."""
    from nsa_dist import ModelConfig, NSAConfig
    from nsa_dist.models import NSADecoderLM

    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=64, max_seq_len=128, tie_embeddings=False,
                      nsa=NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=3, window=16))
    torch.manual_seed(0)
    model = NSADecoderLM(cfg, backend="reference").double()
    ids = torch.randint(0, 97, (2, 40))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[1, :5] = -100
    full = model(ids, labels)
    full.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.loss_chunk = 13
    out = model(ids, labels)
    assert out.logits is None
    # the loss is float32 in both paths (logits.float()); only the summation order differs
    torch.testing.assert_close(out.loss.double(), full.loss.double(), rtol=1e-6, atol=0)
    out.loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-8, msg=n)
    with torch.no_grad():  # evaluation: no checkpointing, same number
        torch.testing.assert_close(model(ids, labels).loss.double(), full.loss.double(), rtol=1e-6, atol=0)


def _twin_grads(cfg_a: ModelConfig, cfg_b: ModelConfig, packed: bool, setup=None):
    """Models of two configs with the same weights (fp32, nonzero gate/phi outputs): (loss,
    logits, gradients) of each on the same batch."""
    torch.manual_seed(0)
    a = NSADecoderLM(cfg_a, backend="reference")
    with torch.no_grad():
        for p in a.parameters():
            if p.abs().max() == 0:
                p.normal_(0.0, 0.1)
    b = NSADecoderLM(cfg_b, backend="reference")
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, cfg_a.vocab_size, (1 if packed else 2, 48), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 20, 48], dtype=torch.int32) if packed else None
    out = []
    setups = setup if isinstance(setup, tuple) else (setup, setup)
    for m, fn in zip((a, b), setups):
        if fn is not None:
            fn(m)
        o = m(ids, torch.roll(ids, -1, 1), cu_seqlens=cu)
        o.loss.backward()
        out.append((o.loss.detach(), o.logits.detach(), {n: p.grad for n, p in m.named_parameters()}))
    return out


@pytest.mark.parametrize("variant", ["nsa", "nsa_packed", "nsa_shared_kv", "dense", "dense_packed"])
def test_fused_projection_equals_separate_projections(variant):
    """One GEMM over q, every K/V and the gate's first layer (RoPE once over q and the keys)
    gives the separate projections' outputs and gradients (fp32, CPU, 1e-5)."""
    nsa = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=4, window=16, phi="mlp",
                    shared_kv=variant == "nsa_shared_kv")
    cfg = ModelConfig(**{**TINY.to_dict(), "nsa": nsa, "attention": variant.split("_")[0],
                         "tie_embeddings": False})
    assert cfg.fused_projection  # the default
    unfused = ModelConfig(**{**cfg.to_dict(), "fused_projection": False})
    (la, ya, ga), (lb, yb, gb) = _twin_grads(cfg, unfused, packed=variant.endswith("packed"))
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-5, msg=n)
        assert gb[n].abs().max() > 0, f"{n}: zero gradient, the comparison checks nothing"


def test_model_config_execution_options_are_checked():
    with pytest.raises(ValueError, match="fused_projection=.*true or false"):
        ModelConfig(fused_projection="yes")


@pytest.mark.parametrize("mode", ["full", "keep_attention"])
@pytest.mark.parametrize("variant", ["nsa", "nsa_packed", "dense_packed"])
def test_recompute_modes_equal_no_recomputation(mode, variant):
    """model.config.recompute with activation checkpointing on: the same loss and gradients
    as a model that recomputes nothing (fp32, CPU, 1e-5); "none" ignores the switch."""
    nsa = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=4, window=16, phi="mlp")
    base = ModelConfig(**{**TINY.to_dict(), "nsa": nsa, "attention": variant.split("_")[0]})
    assert base.recompute == "auto"  # the default: keep_attention where it fits the GPU, else full
    cfg = ModelConfig(**{**base.to_dict(), "recompute": mode})
    none = ModelConfig(**{**base.to_dict(), "recompute": "none"})

    def on(m):
        m.gradient_checkpointing = True
        m.train()
    (la, ya, ga), (lb, yb, gb) = _twin_grads(cfg, none, packed=variant.endswith("packed"), setup=on)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-5, msg=n)
        assert gb[n].abs().max() > 0, f"{n}: zero gradient, the comparison checks nothing"


def test_keep_attention_runs_the_attention_function_once():
    """keep_attention recomputes the projections but not the NSA function (selection and
    attention), full recomputes both: counted calls of the function per training step."""
    from nsa_dist import ops

    nsa = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=4, window=16)
    ids = torch.randint(0, 97, (1, 32), generator=torch.Generator().manual_seed(0))
    calls = {}
    for mode in ("full", "keep_attention", "none"):
        torch.manual_seed(0)
        model = NSADecoderLM(ModelConfig(**{**TINY.to_dict(), "nsa": nsa, "recompute": mode}), backend="reference")
        model.gradient_checkpointing = True
        model.train()
        count = {"attn": 0, "select": 0, "given": 0}
        orig_attn, orig_select = ops.nsa_attention, ops.select_blocks

        def attn(*a, **k):
            count["attn"] += 1
            count["given"] += k.get("block_indices") is not None
            return orig_attn(*a, **k)

        def select(*a, **k):
            count["select"] += 1
            return orig_select(*a, **k)
        ops.nsa_attention, ops.select_blocks = attn, select
        try:
            model(ids, ids).loss.backward()
        finally:
            ops.nsa_attention, ops.select_blocks = orig_attn, orig_select
        calls[mode] = count
    layers = TINY.num_layers
    # one op call per layer selects and attends (no separate selection on one device)
    assert calls["none"] == calls["keep_attention"] == {"attn": layers, "select": 0, "given": 0}
    # full recomputes each layer's call, which attends with the forward's selection
    assert calls["full"] == {"attn": 2 * layers, "select": 0, "given": layers}


def test_recompute_mode_is_checked():
    with pytest.raises(ValueError, match="recompute='selective': must be one of 'full', 'keep_attention', 'auto', 'min', 'none'"):
        ModelConfig(recompute="selective")


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_auto_recompute_keeps_attention_where_it_fits(attention):
    """recompute "auto": keep_attention in as many of the last layers as their kept tensors
    fit the budget, full before them; full on the CPU without a budget and under ZeRO-3.
    The kept bytes grow with the tokens and count this model's heads and dims."""
    from nsa_dist.models.decoder import recompute_plan

    model = NSADecoderLM(ModelConfig(**{**TINY.to_dict(), "attention": attention, "recompute": "auto"}),
                         backend="reference")
    attn = model.layers[0].attn
    hq, h = TINY.num_heads, TINY.num_kv_heads
    dk = dv = TINY.head_dim
    if attention == "nsa":
        per = 2 * (hq * (dk + 4 * dv + 3) + 2 * h * (dk + dv)) + 4 * (3 * hq + h * attn.config.num_selected)
    else:
        per = 2 * (2 * hq + h) * (dk + dv) + 4 * hq
    assert attn.kept_bytes(2, 100, torch.bfloat16) == 2 * 100 * per
    h_small = torch.zeros(2, 100, TINY.hidden_size, dtype=torch.bfloat16)
    if attention == "dense":  # SDPA's output and lse alone (a selective checkpoint): on any device
        per = 2 * hq * dv + 4 * hq
    assert attn.kept_bytes(2, 100, torch.bfloat16, h_small.device) == 2 * 100 * per
    layer_bytes, L = 2 * 100 * per, TINY.num_layers
    assert L >= 2
    assert recompute_plan(model, h_small, budget=L * layer_bytes) == ["keep_attention"] * L
    assert recompute_plan(model, h_small, budget=L * layer_bytes - 1) == ["full"] + ["keep_attention"] * (L - 1)
    assert recompute_plan(model, h_small, budget=layer_bytes) == ["full"] * (L - 1) + ["keep_attention"]
    assert recompute_plan(model, h_small, budget=layer_bytes - 1) == ["full"] * L
    assert recompute_plan(model, h_small) == ["full"] * L  # a CPU tensor, no budget: nothing to plan with
    model.recompute_budget = L * layer_bytes  # what the trainer sets on a GPU
    assert recompute_plan(model, h_small) == ["keep_attention"] * L
    model.allow_keep_attention = False  # set by the trainer under ZeRO-3
    assert recompute_plan(model, h_small) == ["full"] * L
    model.config.recompute = "keep_attention"
    assert recompute_plan(model, h_small, budget=1) == ["keep_attention"] * L  # explicit modes stay


@pytest.mark.parametrize("mode", ["auto", "min"])
def test_a_planned_stack_equals_no_recomputation(mode):
    """recompute "auto" with a budget for the last layer's kept attention (the others full,
    reusing their forward's selection), and "min" with a budget for every layer's kept attention
    and one layer's activations (the last recomputes nothing, as planned from a real probe
    forward): loss and gradients equal to recomputing nothing (fp32, CPU, 1e-5)."""
    from nsa_dist.models.decoder import activation_bytes

    nsa = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=4, window=16, phi="mlp")
    base = ModelConfig(**{**TINY.to_dict(), "nsa": nsa, "recompute": mode})
    none = ModelConfig(**{**base.to_dict(), "recompute": "none"})
    L = TINY.num_layers

    def on(m):
        m.gradient_checkpointing = True
        m.train()
        if m.config.recompute == mode:
            kept = m.layers[-1].attn.kept_bytes(1, 48, torch.float32)
            if mode == "auto":
                m.recompute_budget = kept  # the last layer only
            else:
                h = torch.randn(1, 48, TINY.hidden_size)
                m.recompute_budget = L * kept + activation_bytes(m.layers[-1], h, torch.tensor([0, 20, 48]), None) - kept
            plans.append(m)
    plans = []
    (la, ya, ga), (lb, yb, gb) = _twin_grads(base, none, packed=True, setup=on)
    (plan,) = plans[0]._recompute_plans.values()
    want = ["full"] * (L - 1) + ["keep_attention"] if mode == "auto" else ["keep_attention"] * (L - 1) + ["none"]
    assert plan == want, plan
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-5, msg=n)
        assert gb[n].abs().max() > 0, n


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_min_recompute_plans_nothing_recomputed_where_the_activations_fit(attention):
    """recompute "min": "auto"'s plan, then, once every layer keeps its attention, nothing
    recomputed ("none") in as many of the last layers as their saved activations beyond what
    they keep fit the rest of the budget; the probe runs once per shape; without a probe or
    under a tensor / sequence parallel plan (collectives in the layers) "min" is "auto". The
    probe's bytes (``activation_bytes``) exceed what keep_attention keeps and grow with the
    tokens."""
    from types import SimpleNamespace

    from nsa_dist.models.decoder import activation_bytes, recompute_plan, recompute_summary

    model = NSADecoderLM(ModelConfig(**{**TINY.to_dict(), "attention": attention, "recompute": "min"}),
                         backend="reference")
    L = TINY.num_layers
    h = torch.randn(1, 48, TINY.hidden_size)
    kept = model.layers[0].attn.kept_bytes(1, 48, h.dtype, h.device)
    act = activation_bytes(model.layers[-1], h, None, None)
    assert act > kept > 0
    assert 1.7 < activation_bytes(model.layers[-1], torch.randn(1, 96, TINY.hidden_size), None, None) / act < 2.3
    probes = []
    probe = lambda layer: probes.append(layer) or act  # noqa: E731
    extra = act - kept
    assert recompute_plan(model, h, budget=L * kept + L * extra, probe=probe) == ["none"] * L
    assert probes == [model.layers[-1]]
    assert recompute_plan(model, h, budget=L * kept + L * extra, probe=probe) == ["none"] * L  # kept, no probe
    assert len(probes) == 1
    assert recompute_plan(model, h, budget=L * kept + extra, probe=probe) == ["keep_attention"] * (L - 1) + ["none"]
    assert recompute_plan(model, h, budget=L * kept + extra - 1, probe=probe) == ["keep_attention"] * L
    assert recompute_plan(model, h, budget=L * kept - 1, probe=probe) == ["full"] + ["keep_attention"] * (L - 1)
    assert len(probes) == 3  # once per (shape, budget); a budget short of every layer's attention: none
    assert recompute_plan(model, h, budget=L * kept + L * extra + 1) == ["keep_attention"] * L  # no probe
    assert "none 1/2 + keep_attention 1/2" in recompute_summary(model) and L == 2
    model.comm.state = SimpleNamespace(replica_size=2)  # what a tp / sp / cp plan's LM hooks carry
    assert recompute_plan(model, h, budget=L * kept + L * extra + 2, probe=probe) == ["keep_attention"] * L


def test_dense_keep_attention_keeps_sdpa_outputs_and_equals_no_recomputation():
    """Dense keep_attention: the block is checkpointed whole with SDPA's results kept, so SDPA's
    attention op runs once per layer (not again in the recomputation, as under "full"); loss
    and gradients equal recomputing nothing (fp32, CPU, 1e-5)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sdpa = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            self.sdpa += "scaled_dot_product" in name and "backward" not in name
            return func(*args, **(kwargs or {}))

    base = ModelConfig(**{**TINY.to_dict(), "attention": "dense"})
    torch.manual_seed(0)
    models = {mode: NSADecoderLM(ModelConfig(**{**base.to_dict(), "recompute": mode}), backend="reference")
              for mode in ("keep_attention", "full", "none")}
    for m in models.values():
        m.load_state_dict(models["none"].state_dict())
    ids = torch.randint(0, base.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    out = {}
    for mode, m in models.items():
        m.gradient_checkpointing = True
        m.train()
        with Count() as count:
            loss = m(ids, torch.roll(ids, -1, 1)).loss
            loss.backward()
        out[mode] = (count.sdpa, loss.detach(), {n: p.grad for n, p in m.named_parameters()})
    L = base.num_layers
    assert [out[m][0] for m in models] == [L, 2 * L, L], {m: out[m][0] for m in models}
    for mode in ("keep_attention", "full"):
        torch.testing.assert_close(out[mode][1], out["none"][1], rtol=1e-5, atol=1e-5)
        for n, g in out["none"][2].items():
            torch.testing.assert_close(out[mode][2][n], g, rtol=1e-5, atol=1e-5, msg=f"{mode} {n}")
            assert g.abs().max() > 0, n


def _cpu_candidates(q, k, v):
    from nsa_dist.modules.dense import sdpa_causal
    return {"sdpa_cudnn": sdpa_causal("cudnn"),  # cannot run on a CPU: skipped
            "sdpa_math": sdpa_causal("math"), "sdpa_flash": sdpa_causal("flash"),
            "sdpa_math_expanded": sdpa_causal("math", expand_kv=True)}


def test_dense_attention_pick_keeps_the_candidates_warnings_to_itself():
    """SDPA explains in UserWarnings why a backend cannot take the inputs before it raises; the
    pick drops those candidates quietly (a bench log showed six such warnings per dense point)
    and names the reasons only when no candidate runs."""
    import warnings

    from nsa_dist.modules.dense import CausalAttention

    def refusing(q, k, v, bounds):
        warnings.warn("cuDNN attention kernel not used because: ...", UserWarning)
        raise RuntimeError("no available kernel")

    def working(q, k, v, bounds):
        warnings.warn("Memory efficient kernel not used because: ...", UserWarning)
        return q * 1.0
    ca = CausalAttention(timer=lambda run: (run(), 1.0)[1])
    ca.candidates = lambda q, k, v: {"refusing": refusing, "working": working}
    q = torch.randn(1, 8, 2, 4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert ca._pick(ca.candidates(q, q, q), q, q, q, [0, 8]) == "working"
    assert not seen, [str(w.message) for w in seen]
    # when nothing runs, the error says why each candidate refused (its warnings and its error)
    with pytest.raises(RuntimeError, match=r"refusing: cuDNN attention kernel not used because: \.\.\.; "
                                           r"no available kernel"):
        ca._pick({"refusing": refusing}, q, q, q, [0, 8])


def test_dense_attention_picks_the_fastest_candidate_once_per_shape():
    """CausalAttention times each candidate that runs (fwd + bwd) on the first call of a shape,
    keeps the fastest, reports it, and gives SDPA's result; on a CPU it runs SDPA unmeasured.
    Under activation checkpointing the dense model's gradients are unchanged."""
    from nsa_dist.modules.dense import CausalAttention

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 40, 4, 8, generator=g), torch.randn(2, 40, 2, 8, generator=g), torch.randn(2, 40, 2, 8, generator=g)
    plain = CausalAttention()
    want = plain(q, k, v)
    assert plain.last == "sdpa" and list(plain.chosen.values()) == ["sdpa"]
    speed = {"sdpa_math": 3.0, "sdpa_flash": 2.0, "sdpa_math_expanded": 1.0}
    timed = []

    def timer(run):
        run()  # raises for a backend that cannot run
        timed.append(len(timed))
        return speed[list(speed)[(len(timed) - 1) % 3]]
    ca = CausalAttention(timer=timer)
    ca.candidates = _cpu_candidates
    torch.testing.assert_close(ca(q, k, v), want, rtol=1e-5, atol=1e-5)
    assert ca.last == "sdpa_math_expanded" and len(timed) == 3
    ca(q, k, v)
    assert len(timed) == 3, "timed again for a shape already measured"
    cu = torch.tensor([0, 10, 80], dtype=torch.int32)  # longest document 70 > 64: measured anew
    qp, kp, vp = (t.reshape(1, 80, *t.shape[2:]) for t in (q, k, v))
    torch.testing.assert_close(ca(qp, kp, vp, cu), plain(qp, kp, vp, cu), rtol=1e-5, atol=1e-5)
    assert len(timed) == 6 and len(ca.chosen) == 2

    cfg = ModelConfig(**{**TINY.to_dict(), "attention": "dense"})
    measured = []

    def fast_candidates(model):  # CPU candidates, measured inside the checkpoint's first forward
        model.causal_attention.candidates = _cpu_candidates
        model.causal_attention.timer = lambda run: (run(), measured.append(1), 1.0)[2]
        model.gradient_checkpointing = True
        model.train()
    (la, _, ga), (lb, _, gb) = _twin_grads(cfg, cfg, packed=True, setup=(fast_candidates, None))
    assert len(measured) == 3, "the model did not measure its candidates"
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-5, msg=n)


def test_flash_attn_varlen_packs_batches_and_documents():
    """flash_attn_causal's layout (every document, or each of B sequences, one varlen call)
    against SDPA, with a stand-in for flash-attn's function."""
    from nsa_dist.modules.dense import flash_attn_causal, sdpa_causal

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):
        assert causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
        assert max_q == max(int(b - a) for a, b in zip(cu_q[:-1], cu_q[1:]))
        out = [torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True,
            enable_gqa=True).transpose(0, 1) for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist())]
        return torch.cat(out)
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 24, 4, 8, generator=g), torch.randn(2, 24, 2, 8, generator=g), torch.randn(2, 24, 2, 8, generator=g)
    fa, sd = flash_attn_causal(varlen), sdpa_causal()
    torch.testing.assert_close(fa(q, k, v, [0, 24]), sd(q, k, v, [0, 24]), rtol=1e-6, atol=1e-6)
    qp, kp, vp = (t.reshape(1, 48, *t.shape[2:]) for t in (q, k, v))
    torch.testing.assert_close(fa(qp, kp, vp, [0, 7, 30, 48]), sd(qp, kp, vp, [0, 7, 30, 48]), rtol=1e-6, atol=1e-6)


def test_recompute_summary_names_the_kept_layers():
    from nsa_dist.models.decoder import recompute_plan, recompute_summary

    model = NSADecoderLM(ModelConfig(**{**TINY.to_dict(), "recompute": "auto"}), backend="reference")
    assert recompute_summary(model) == "none"  # checkpointing off
    model.gradient_checkpointing = True
    assert recompute_summary(model) == "auto"  # no training forward yet
    h = torch.zeros(1, 40, TINY.hidden_size)
    recompute_plan(model, h, budget=model.layers[-1].attn.kept_bytes(1, 40, torch.float32))
    assert recompute_summary(model) == f"keep_attention 1/{TINY.num_layers}"

"""Inference path: prefill + decode equal a full forward pass, read counters, generate(), errors."""
import pytest
import torch

from nsa_dist import ModelConfig, NSAConfig
from nsa_dist.inference import (LayerCache, ModelCache, decode_layer, decode_step, dense_reads,
                                expected_reads, generate, prefill, prefill_layer, sample_next,
                                sel_reads_from_indices, seed_reads)
from nsa_dist.models import NSADecoderLM
from nsa_dist.modules import NSAAttention
from nsa_dist.ops import num_compressed, select_blocks

# l=8, d=4, l'=16, n=3, w=12: emissions every 4 tokens from S=8, window full from 12,
# selection blocks every 16, top-n active from n*l' = 48.
CFG = dict(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=3, window=12)


def _randomise(module, std=0.1, seed=0):
    """Non-zero weights everywhere (gate and phi outputs included) so every path matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def _layer(phi="mean", shared_kv=False, v_head_dim=0, **kw):
    cfg = NSAConfig(**{**CFG, **kw}, phi=phi, shared_kv=shared_kv)
    return _randomise(NSAAttention(32, 4, 2, 8, v_head_dim, cfg, backend="reference"))


@pytest.mark.parametrize("phi", ["mean", "mlp"])
@pytest.mark.parametrize("shared_kv", [False, True], ids=["own_kv", "shared_kv"])
def test_layer_prefill_then_decode_equals_full_forward(phi, shared_kv):
    _check_layer_decode(_layer(phi, shared_kv))


@pytest.mark.parametrize("kw", [dict(window=0), dict(v_head_dim=12), dict(cmp_block=16, window=40)],
                         ids=["no_window", "dv12", "l16_w40"])
def test_layer_decode_other_shapes(kw):
    _check_layer_decode(_layer(**kw))


def _check_layer_decode(m):
    gen = torch.Generator().manual_seed(1)
    T, lengths = 70, torch.tensor([3, 9])
    x = torch.randn(2, T, 32, generator=gen)
    prompt = x[:, :9].clone()
    prompt[0, 3:] = 100 * torch.randn(6, 32, generator=gen)  # right padding must not leak
    y0, cache, _ = prefill_layer(m, prompt, lengths, max_len=T)
    outs = [[y0[0, :3]], [y0[1, :9]]]
    steps = T - 9
    for k in range(steps):
        tok = torch.stack([x[0, 3 + k], x[1, 9 + k]])[:, None]
        y, _, _ = decode_layer(m, tok, cache)
        outs[0].append(y[0])
        outs[1].append(y[1])
    assert cache.lengths.tolist() == [3 + steps, T]
    for b, n_tok in enumerate(cache.lengths.tolist()):
        full, _ = m(x[b:b + 1, :n_tok])
        got = torch.cat(outs[b])
        assert got.shape == full[0].shape
        assert (got - full[0]).abs().max().item() < 1e-5


def test_layer_decode_selection_matches_full_forward():
    m = _layer()
    x = torch.randn(1, 100, 32, generator=torch.Generator().manual_seed(2))
    p = m.project(x, torch.arange(100))
    _, idx_full = m.attend(p)
    _, cache, idx0 = prefill_layer(m, x[:, :1], max_len=100)
    assert torch.equal(idx0[0, 0], idx_full[0, 0])
    for t in range(1, 100):
        _, idx, _ = decode_layer(m, x[:, t], cache)
        assert torch.equal(idx[0], idx_full[0, t]), f"selection differs at t={t}"


@pytest.mark.parametrize("phi,shared_kv", [("mean", False), ("mlp", True)])
def test_model_prefill_then_decode_equals_full_forward(phi, shared_kv):
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, max_seq_len=64, nsa=NSAConfig(**CFG, phi=phi, shared_kv=shared_kv))
    torch.manual_seed(0)
    model = _randomise(NSADecoderLM(cfg, backend="reference")).eval()
    ids = torch.randint(0, 50, (2, 64), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([5, 2])
    prompt = ids[:, :5].clone()
    prompt[1, 2:] = 0
    with torch.no_grad():
        logits0, cache = prefill(model, prompt, lengths)
        got = [[logits0[0, :5]], [logits0[1, :2]]]
        for k in range(57):
            step, stats = decode_step(model, cache, torch.stack([ids[0, 5 + k], ids[1, 2 + k]]))
            got[0].append(step[:1])
            got[1].append(step[1:])
        assert len(stats.layers) == 2
        for b, n_tok in enumerate(cache.lengths.tolist()):
            full = model(ids[b:b + 1, :n_tok]).logits[0]
            assert (torch.cat(got[b]) - full).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------- counters
def test_closed_form_counters_by_hand():
    cfg = NSAConfig(**{**CFG, "window": 24})
    # S=1: nothing compressed, the one position in block 0, the window holds 1.
    assert expected_reads(1, cfg) == (0, 1, 1)
    assert expected_reads(8, cfg) == (1, 8, 8)  # first emission
    assert expected_reads(17, cfg) == (3, 17, 17)  # blocks 0 and 1 (partial)
    assert expected_reads(49, cfg) == (11, 2 * 16 + 1, 24)  # n=3: blocks 0, 2 and partial 3, all forced
    assert seed_reads(48, cfg) == num_compressed(48, cfg) + 3 * 16 + 24
    assert seed_reads(64, cfg) == sum(expected_reads(64, cfg))
    assert dense_reads(64) == 64
    for bad in (40, 50):
        with pytest.raises(ValueError, match="seed formula"):
            seed_reads(bad, cfg)
    with pytest.raises(ValueError, match=">= 1"):
        expected_reads(0, cfg)


def test_decode_reads_equal_spec_closed_form_across_every_boundary():
    m = _layer(window=24)  # w=24 is neither a multiple of l' nor of l
    cfg = m.config
    S_max = 130
    x = torch.randn(2, S_max, 32, generator=torch.Generator().manual_seed(4))
    _, cache, _ = prefill_layer(m, x[:, :1], max_len=S_max)
    full_idx = select_blocks(m.project(x, torch.arange(S_max))["q"],
                             m.project(x, torch.arange(S_max))["k_cmp"], cfg)
    seen_seed = 0
    for S in range(2, S_max + 1):
        _, idx, reads = decode_layer(m, x[:, S - 1], cache)
        cmp, sel, win = expected_reads(S, cfg)
        r = reads.reads
        assert r.shape == (2, 2, 3)
        assert (r[..., 0] == cmp).all() and (r[..., 2] == win).all()
        assert (r[..., 1] == sel).all(), f"S={S}"
        # SPEC's definition from the indices, for this step's and the full forward's selection
        assert (sel_reads_from_indices(idx, S, cfg) == sel).all()
        assert (sel_reads_from_indices(full_idx[:, S - 1], S, cfg) == sel).all()
        if S % cfg.sel_block == 0 and S >= cfg.num_selected * cfg.sel_block:
            assert r[0, 0].sum().item() == seed_reads(S, cfg)
            seen_seed += 1
    assert seen_seed == 6  # S = 48, 64, ..., 128


# ----------------------------------------------------------------------------- generate
def _tiny_model(**nsa):
    cfg = ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, max_seq_len=48, nsa=NSAConfig(**{**CFG, **nsa}))
    torch.manual_seed(0)
    return _randomise(NSADecoderLM(cfg, backend="reference"), std=0.3).eval()


def test_greedy_generate_equals_argmax_of_full_forward():
    model = _tiny_model()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [3]]
    out = generate(model, prompts, max_new_tokens=30)
    assert [len(t) for t in out.tokens] == [30, 30, 30] and not out.finished.any()
    with torch.no_grad():
        for p, new in zip(prompts, out.tokens):
            seq = list(p)
            for _ in range(30):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            assert seq[len(p):] == new
    assert len(out.step_stats) == 29
    assert out.step_stats[-1].per_branch()["win"] > 0


def test_stop_token_and_sampling():
    model = _tiny_model()
    greedy = generate(model, [[1, 2, 3]], max_new_tokens=10).tokens[0]
    stop = greedy[3]
    out = generate(model, [[1, 2, 3], [5]], max_new_tokens=10, stop_token=stop)
    assert out.tokens[0] == greedy[:greedy.index(stop) + 1] and out.finished[0]
    # a tiny nucleus keeps only the most likely token: greedy again
    nucleus = generate(model, [[1, 2, 3]], max_new_tokens=10, temperature=1.0, top_p=1e-6,
                       generator=torch.Generator().manual_seed(0))
    assert nucleus.tokens[0] == greedy
    a = generate(model, [[1, 2, 3]], 10, temperature=1.5, generator=torch.Generator().manual_seed(5))
    b = generate(model, [[1, 2, 3]], 10, temperature=1.5, generator=torch.Generator().manual_seed(5))
    assert a.tokens == b.tokens


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.75, gen)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, -1.0)


# ----------------------------------------------------------------------------- bad input
def test_decode_past_max_len_is_a_clear_error():
    m = _layer()
    x = torch.randn(1, 6, 32)
    _, cache, _ = prefill_layer(m, x[:, :4], max_len=5)
    decode_layer(m, x[:, 4], cache)
    with pytest.raises(ValueError, match="max_len=5"):
        decode_layer(m, x[:, 5], cache)
    model = _tiny_model()
    with pytest.raises(ValueError, match="max_len=48"):
        generate(model, [[1] * 40], max_new_tokens=10)
    with pytest.raises(ValueError, match="exceeds max_len"):
        prefill(model, torch.zeros(1, 49, dtype=torch.long))
    with torch.no_grad():
        _, mc = prefill(model, torch.zeros(1, 48, dtype=torch.long))
        with pytest.raises(ValueError, match="cannot decode past max_len=48"):
            decode_step(model, mc, torch.tensor([1]))


def test_cache_from_another_config_is_a_clear_error():
    m = _layer()
    _, cache, _ = prefill_layer(m, torch.randn(1, 4, 32), max_len=10)
    other = _layer(window=8)
    with pytest.raises(ValueError, match="built for NSAConfig"):
        decode_layer(other, torch.randn(1, 1, 32), cache)
    wide = _randomise(NSAAttention(32, 4, 4, 8, 0, m.config, backend="reference"))
    with pytest.raises(ValueError, match="kv heads"):
        decode_layer(wide, torch.randn(1, 1, 32), cache)
    with pytest.raises(ValueError, match="batch"):
        decode_layer(m, torch.randn(3, 1, 32), cache)
    model, deeper = _tiny_model(), _tiny_model()
    with torch.no_grad():
        _, mc = prefill(model, torch.ones(1, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="another model"):
            decode_step(deeper, ModelCache(mc.layers[:1]), torch.tensor([1]))
        with pytest.raises(ValueError, match="built for NSAConfig"):
            decode_step(_tiny_model(window=4), mc, torch.tensor([1]))


def test_dense_models_are_refused_clearly():
    cfg = ModelConfig(vocab_size=40, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=8, max_seq_len=16, attention="dense")
    with pytest.raises(ValueError, match="attention='nsa' models only"):
        prefill(NSADecoderLM(cfg), torch.ones(1, 3, dtype=torch.long))


def test_bad_prompts_and_lengths():
    m = _layer()
    with pytest.raises(ValueError, match="every length"):
        prefill_layer(m, torch.randn(2, 4, 32), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="every length"):
        prefill_layer(m, torch.randn(2, 4, 32), torch.tensor([5, 4]))
    with pytest.raises(ValueError, match="at least one token"):
        generate(_tiny_model(), [[1], []], 3)
    with pytest.raises(ValueError, match="max_len must be"):
        LayerCache.empty(m.config, 1, 0, 2, 8, 8)


@pytest.mark.parametrize("l,d,ls", [(8, 4, 16), (32, 16, 64), (16, 16, 16), (64, 16, 64), (16, 8, 64)])
def test_banded_block_importance_equals_reference_matmul(l, d, ls):
    from nsa_dist.inference.decode import block_importance
    from nsa_dist.ops import num_sel_blocks
    from nsa_dist.ops.reference import group_importance

    cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=ls, num_selected=3)
    gen = torch.Generator().manual_seed(l + ls)
    for S in (1, l, 3 * ls + 5, 40 * ls):
        nc, ns = num_compressed(S, cfg), num_sel_blocks(S, cfg)
        p = torch.rand(2, 3, 2, nc, generator=gen)
        ref = group_importance(p[:, :, :, None, :], ns, cfg)[:, 0]  # [B, H, Ns]
        got = block_importance(p, ns, cfg)
        assert got.shape == ref.shape == (2, 3, ns)
        assert torch.allclose(got, ref, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- tools
def _tool(name):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_config(tmp_path):
    cfg = ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, max_seq_len=48, nsa=NSAConfig(**CFG))
    path = tmp_path / "model.yaml"
    cfg.to_yaml(path)
    return cfg, str(path)


def test_generate_cli_loads_pt_and_safetensors(tmp_path, capsys):
    from safetensors.torch import save_file

    tool = _tool("generate")
    cfg, cfg_path = _write_config(tmp_path)
    torch.manual_seed(0)
    model = _randomise(NSADecoderLM(cfg, backend="reference"), std=0.3).eval()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(tmp_path / "m.safetensors"))
    expected = generate(model, [[1, 2, 3]], 6).tokens[0]
    for ckpt in ("m.pt", "m.safetensors"):
        assert tool.main(["--config", cfg_path, "--checkpoint", str(tmp_path / ckpt),
                          "--prompt-ids", "1,2,3", "--max-new-tokens", "6"]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line == "1,2,3 | " + ",".join(map(str, expected))
    other = ModelConfig(vocab_size=40, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                        head_dim=8, max_seq_len=48, nsa=NSAConfig(**CFG))
    other.to_yaml(tmp_path / "other.yaml")
    # the tool reports bad input as one line on stderr and exit status 2
    assert tool.main(["--config", str(tmp_path / "other.yaml"), "--checkpoint", str(tmp_path / "m.pt"),
                      "--prompt-ids", "1"]) == 2
    assert "does not fit the model config" in capsys.readouterr().err
    assert tool.main(["--config", cfg_path, "--checkpoint", str(tmp_path / "nope.pt"), "--prompt-ids", "1"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert tool.main(["--config", cfg_path, "--random-weights", "--prompt-ids", "1", "--prompt-ids", "4,5",
                      "--max-new-tokens", "3", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "5"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_bench_decode_cli_small(tmp_path, capsys, monkeypatch):
    import csv
    import sys

    tool = _tool("bench_decode")
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # an optional package that is missing
    out = tmp_path / "bench.csv"
    assert tool.main(["--batches", "1,2", "--contexts", "256,1024", "--device", "cpu", "--heads", "4",
                      "--kv-heads", "2", "--head-dim", "16", "--window", "128", "--num-selected", "4",
                      "--iters", "2", "--warmup", "1", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == tool.FIELDS
    got = {(int(r["batch"]), int(r["context"]), r["method"]) for r in rows}
    assert got == {(B, S, m) for B in (1, 2) for S in (256, 1024) for m in ("nsa_pytorch", "dense_sdpa")}
    cfg = NSAConfig(window=128, num_selected=4)
    for r in rows:
        S = int(r["context"])
        assert r["status"] == "ok" and float(r["ms_per_step"]) > 0
        assert int(r["reads_per_head"]) == (seed_reads(S, cfg) if r["method"].startswith("nsa") else S)
        assert float(r["tokens_per_s"]) == pytest.approx(int(r["batch"]) * 1e3 / float(r["ms_per_step"]), rel=1e-2)
    text = capsys.readouterr().out
    assert "flash-attn unavailable" in text and "| batch | context |" in text


def test_generate_cli_with_a_tokenizer(tmp_path, tokenizer_dir, capsys):
    pytest.importorskip("sentencepiece")
    tool = _tool("generate")
    cfg = ModelConfig(vocab_size=400, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=8, max_seq_len=64, nsa=NSAConfig(**CFG))
    cfg.to_yaml(tmp_path / "m.yaml")
    assert tool.main(["--config", str(tmp_path / "m.yaml"), "--random-weights", "--tokenizer",
                      str(tokenizer_dir), "--prompt", "def main(", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def main(")
    with pytest.raises(SystemExit, match="needs --tokenizer"):
        tool.main(["--config", str(tmp_path / "m.yaml"), "--random-weights", "--prompt", "x"])


# ----------------------------------------------------------------------------- bad input leaves the caches alone
def _snapshot(caches):
    """Every tensor of the caches (cloned) and the host-side counts."""
    caches = caches if isinstance(caches, list) else [caches]
    return [({k: v.clone() for k, v in vars(c).items() if isinstance(v, torch.Tensor)}, c.host_max)
            for c in caches]


def _unchanged(caches, snap):
    caches = caches if isinstance(caches, list) else [caches]
    for c, (tensors, host) in zip(caches, snap):
        assert c.host_max == host
        for k, v in tensors.items():
            assert torch.equal(getattr(c, k), v), f"{k} was written"


def _refused_fill(P: int, lengths: list, match: str) -> None:
    """A fill of a P-token prompt with ``lengths`` into a 12-token cache: ValueError, no write."""
    _, cache, _ = prefill_layer(_layer(), torch.randn(2, 5, 32), max_len=12)
    snap = _snapshot(cache)
    kv = {k: torch.randn(2, P, 2, 8) for k in ("k_sel", "v_sel", "k_win", "v_win", "k_raw", "v_raw")}
    nc = num_compressed(P, cache.config)
    kv["k_cmp"], kv["v_cmp"] = torch.randn(2, nc, 2, 8), torch.randn(2, nc, 2, 8)
    with pytest.raises(ValueError, match=match):
        cache.fill(kv, torch.tensor(lengths))
    _unchanged(cache, snap)


def test_prompt_longer_than_the_cache_writes_nothing():
    _refused_fill(13, [13, 4], "exceeds the cache's max_len=12")
    with pytest.raises(ValueError, match="exceeds max_len"):
        prefill(_tiny_model(), torch.ones(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_len=8"):
        prefill_layer(_layer(), torch.randn(1, 9, 32), max_len=8)


def test_empty_prompt_in_a_batch_writes_nothing():
    _refused_fill(4, [4, 0], "every length must be in")
    with pytest.raises(ValueError, match="at least one token"):
        generate(_tiny_model(), [[1, 2], []], 3)
    with pytest.raises(ValueError, match="every length must be in"):
        generate(_tiny_model(), torch.ones(2, 3, dtype=torch.long), 3, lengths=torch.tensor([3, 0]))


def test_dtype_and_device_mismatch_write_nothing():
    m = _layer()
    _, cache, _ = prefill_layer(m, torch.randn(2, 5, 32), max_len=12)
    snap = _snapshot(cache)
    with pytest.raises(ValueError, match="dtype torch.float64 but the cache torch.float32"):
        decode_layer(m.double(), torch.randn(2, 1, 32, dtype=torch.float64), cache)
    m.float()
    with pytest.raises(ValueError, match="is on meta but the cache on cpu"):
        decode_layer(m, torch.randn(2, 1, 32, device="meta"), cache)
    _unchanged(cache, snap)
    # model level: every layer is checked before the first one writes
    model = _tiny_model()
    with torch.no_grad():
        _, mc = prefill(model, torch.ones(2, 4, dtype=torch.long))
    snap = _snapshot(mc.layers)
    with pytest.raises(ValueError, match="hidden state has dtype torch.bfloat16"):
        decode_step(model.to(torch.bfloat16), mc, torch.tensor([1, 2]))
    model.float()
    with pytest.raises(ValueError, match="tokens are on meta"):
        decode_step(model, mc, torch.ones(2, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="integer token ids"):
        decode_step(model, mc, torch.ones(2))
    mixed = ModelCache([mc.layers[0], prefill(_tiny_model(window=4), torch.ones(2, 4, dtype=torch.long))[1].layers[1]])
    with pytest.raises(ValueError, match="built for NSAConfig"):
        decode_step(model, mixed, torch.tensor([1, 2]))
    _unchanged(mc.layers, snap)


def test_full_cache_writes_nothing_and_counters_can_be_off():
    m = _layer()
    x = torch.randn(1, 6, 32)
    _, cache, _ = prefill_layer(m, x[:, :4], max_len=5)
    y, idx, reads = decode_layer(m, x[:, 4], cache, count_reads=False)
    assert reads is None and idx.shape == (1, 2, 3)
    snap = _snapshot(cache)
    with pytest.raises(ValueError, match="max_len=5"):
        decode_layer(m, x[:, 5], cache)
    _unchanged(cache, snap)
    model = _tiny_model()
    out = generate(model, [[1, 2, 3]], 5, count_reads=False)
    assert out.step_stats == [] and out.tokens == generate(model, [[1, 2, 3]], 5).tokens


def test_generate_decodes_the_to_hf_bundled_model(tmp_path):
    """The to-hf export bundles its own copy of the model classes; the decode path takes
    them (the NSAAttention interface, not the class), so the export's generate() can call
    nsa_dist.inference.generate on ``hf.model`` when nsa_dist is installed."""
    transformers = pytest.importorskip("transformers")
    import os

    from nsa_dist.convert.cli import main as convert
    from nsa_dist.convert.io import save_consolidated

    model = _tiny_model()
    os.makedirs(tmp_path / "ckpt")
    save_consolidated(model.state_dict(), model.config, str(tmp_path / "ckpt"))
    assert convert(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    assert type(hf.model.layers[0].attn) is not NSAAttention  # the bundled copy
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8]]
    assert generate(hf.model, prompts, 20).tokens == generate(model, prompts, 20).tokens


def test_inputs_that_do_not_fit_the_model_are_refused_before_any_write():
    m = _layer()
    with pytest.raises(ValueError, match="x has dtype torch.float64 but the model's weights torch.float32"):
        prefill_layer(m, torch.randn(1, 4, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="x is on meta but the model on cpu"):
        prefill_layer(m, torch.randn(1, 4, 32, device="meta"))
    model = _tiny_model()
    for bad in (lambda: prefill(model, torch.ones(1, 3)), lambda: generate(model, torch.ones(1, 3), 2)):
        with pytest.raises(ValueError, match="integer token ids"):
            bad()
    with pytest.raises(ValueError, match="input_ids is on meta but the model on cpu"):
        prefill(model, torch.ones(1, 3, dtype=torch.long, device="meta"))
    # a layer cast after prefill: its input still fits the cache, its weights do not
    _, cache, _ = prefill_layer(m, torch.randn(2, 5, 32), max_len=12)
    snap = _snapshot(cache)
    with pytest.raises(ValueError, match="the layer's weights has dtype torch.bfloat16 but the cache"):
        decode_layer(m.to(torch.bfloat16), torch.randn(2, 1, 32), cache)
    _unchanged(cache, snap)


def test_counters_off_compute_nothing(monkeypatch):
    """count_reads=False: no DecodeReads is built and nothing is counted, on every path that
    runs here (the kernel path: tests/ops/test_decode_kernels.py)."""
    import nsa_dist.inference.decode as dec

    def refuse(*a, **k):
        raise AssertionError("a read counter was computed with count_reads=False")
    model = _tiny_model()
    counted = generate(model, [[1, 2, 3], [4]], 6)
    monkeypatch.setattr(dec, "DecodeReads", refuse)
    monkeypatch.setattr(dec, "step_reads", refuse)
    out = generate(model, [[1, 2, 3], [4]], 6, count_reads=False)
    assert out.step_stats == [] and out.tokens == counted.tokens
    m = _layer()
    x = torch.randn(1, 6, 32)
    _, cache, _ = prefill_layer(m, x[:, :4], max_len=6)
    assert decode_layer(m, x[:, 4], cache, count_reads=False)[2] is None
    with pytest.raises(AssertionError, match="count_reads=False"):
        decode_layer(m, x[:, 5], cache)  # the counters are on by default

"""The to-hf export's generate(): nsa_dist's decode path when it can serve the request,
transformers' own loop otherwise, the same tokens either way (greedy, on the CPU)."""
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_export import export_and_load  # noqa: E402
from nsa_dist import ModelConfig, NSAConfig  # noqa: E402
from nsa_dist.inference import generate  # noqa: E402
from nsa_dist.inference import hf_generate as hfg  # noqa: E402
from nsa_dist.models import NSADecoderLM  # noqa: E402

# l=8, d=4, l'=16, n=3, w=12: 7 + 20 tokens cross emissions, the window and a block boundary
CFG = dict(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=3, window=12)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, max_seq_len=48, nsa=NSAConfig(**CFG))
    torch.manual_seed(0)
    model = NSADecoderLM(cfg, backend="reference").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model, export_and_load(model, tmp_path_factory.mktemp("hf"))


@pytest.fixture
def nsa_calls(monkeypatch):
    """How often the export's generate() went through nsa_dist's generate()."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return generate(*args, **kwargs)
    monkeypatch.setattr(hfg, "generate", counted)
    return calls


def test_export_generate_equals_ours_greedy(exported, nsa_calls):
    model, hf = exported
    x = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [9, 8, 3, 3, 2, 1, 5]])
    ours = generate(model, x.tolist(), 20).tokens
    loop = hf.generate(x, max_new_tokens=20, do_sample=False)  # CPU: no decode kernels
    assert nsa_calls == []
    cached = hf.generate(x, max_new_tokens=20, do_sample=False, nsa_decode="reference")
    assert nsa_calls == ["reference"]
    assert loop.shape == cached.shape == (2, 27)
    assert torch.equal(loop, cached) and loop[:, 7:].tolist() == ours
    # transformers' layout after an eos: the row stops, pad_token_id fills it, and the output
    # ends with the longest row
    stop = ours[0][3]
    want = ours[0][:ours[0].index(stop) + 1]
    for decode in ("hf", "reference"):
        out = hf.generate(x[:1], max_new_tokens=20, do_sample=False, eos_token_id=stop, nsa_decode=decode)
        assert out[0, 7:].tolist() == want, decode
        both = hf.generate(x, max_new_tokens=20, do_sample=False, eos_token_id=stop, pad_token_id=0,
                           nsa_decode=decode)
        assert both[0, 7:].tolist() == want + [0] * (20 - len(want)) and both.shape == (2, 27)


def test_export_generate_takes_left_padded_batches(exported):
    """attention_mask picks each row's tokens (transformers pads on the left); each row
    decodes from position 0, as alone."""
    model, hf = exported
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8]]
    ids = torch.tensor([prompts[0], [0] * 5 + prompts[1]])
    mask = (torch.arange(7)[None, :] >= torch.tensor([[0], [5]])).long()
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, nsa_decode="reference")
    assert torch.equal(out[:, :7], ids)
    assert out[:, 7:].tolist() == generate(model, prompts, 12).tokens
    with pytest.raises(ValueError, match="at least one token"):
        hf.generate(ids, attention_mask=mask * 0, max_new_tokens=2, nsa_decode="reference")


def test_auto_takes_nsa_dist_where_kernels_exist_and_falls_back_for_the_rest(exported, nsa_calls, monkeypatch):
    model, hf = exported
    x = torch.tensor([[1, 2, 3, 4, 5]])
    want = hf.generate(x, max_new_tokens=6, do_sample=False, nsa_decode="hf")
    # decode kernels found (as on CUDA): auto decodes through nsa_dist with them; the
    # kernels themselves are checked in tests/ops/test_decode_kernels.py
    monkeypatch.setattr(hfg, "decode_kernels", lambda backend, device, dtype: object())
    monkeypatch.setattr(hfg, "generate", lambda *a, **k: nsa_calls.append(k["backend"]) or generate(
        *a, **{**k, "backend": "reference"}))
    assert torch.equal(hf.generate(x, max_new_tokens=6, do_sample=False), want)
    assert nsa_calls == ["triton"]
    # requests generate() does not implement run transformers' loop under auto, and are an
    # error when nsa_dist's path is asked for by name
    assert torch.equal(hf.generate(x, max_new_tokens=6, do_sample=False, repetition_penalty=1.0), want)
    beams = hf.generate(x, max_new_tokens=6, num_beams=2, do_sample=False)
    assert beams.shape == (1, 11) and nsa_calls == ["triton", "triton"]
    for bad, match in ((dict(num_beams=2), "num_beams=2"), (dict(repetition_penalty=1.3), "repetition_penalty"),
                       (dict(eos_token_id=[3, 4]), "one stop token"), (dict(max_length=4), "nothing to generate")):
        with pytest.raises(ValueError, match=match):
            hf.generate(x, do_sample=False, nsa_decode="reference", **bad)
    with pytest.raises(ValueError, match="nsa_decode must be one of"):
        hf.generate(x, max_new_tokens=2, nsa_decode="cuda")


def test_sampling_through_the_export(exported):
    """do_sample with transformers' defaults (top_k 50) and a seed: reproducible, in vocab;
    top_k=1 is greedy."""
    _, hf = exported
    x = torch.tensor([[1, 2, 3, 4, 5]])
    greedy = hf.generate(x, max_new_tokens=8, do_sample=False, nsa_decode="reference")
    assert torch.equal(hf.generate(x, max_new_tokens=8, do_sample=True, top_k=1, nsa_decode="reference"), greedy)
    torch.manual_seed(3)
    a = hf.generate(x, max_new_tokens=8, do_sample=True, temperature=1.5, nsa_decode="reference")
    torch.manual_seed(3)
    b = hf.generate(x, max_new_tokens=8, do_sample=True, temperature=1.5, nsa_decode="reference")
    assert torch.equal(a, b) and int(a.max()) < 40


def test_export_without_nsa_dist_uses_transformers_loop(exported, monkeypatch):
    _, hf = exported
    x = torch.tensor([[1, 2, 3]])
    want = hf.generate(x, max_new_tokens=4, do_sample=False, nsa_decode="hf")
    monkeypatch.setitem(sys.modules, "nsa_dist.inference.hf_generate", None)  # import fails
    assert torch.equal(hf.generate(x, max_new_tokens=4, do_sample=False), want)
    with pytest.raises(ImportError, match="needs nsa_dist installed"):
        hf.generate(x, max_new_tokens=4, nsa_decode="triton")


def test_top_k_keeps_the_k_most_likely():
    from nsa_dist.inference import sample_next

    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    gen = torch.Generator().manual_seed(0)
    assert {int(sample_next(logits, 1.0, 1.0, gen, top_k=2)) for _ in range(200)} == {1, 3}
    with pytest.raises(ValueError, match="top_k"):
        sample_next(logits, 1.0, 1.0, top_k=-1)


def test_positional_arguments_take_transformers_loop(exported, nsa_calls, monkeypatch):
    _, hf = exported
    x = torch.tensor([[1, 2, 3]])
    monkeypatch.setattr(hfg, "decode_kernels", lambda backend, device, dtype: object())
    procs = transformers.LogitsProcessorList()
    out = hf.generate(x, None, procs, max_new_tokens=3, do_sample=False)
    assert nsa_calls == [] and torch.equal(out, hf.generate(x, max_new_tokens=3, do_sample=False, nsa_decode="hf"))
    with pytest.raises(ValueError, match="by name only"):
        hf.generate(x, None, procs, max_new_tokens=3, nsa_decode="reference")

"""from-hf / to-hf conversions against transformers itself."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nsa_dist import ModelConfig, NSAConfig  # noqa: E402
from nsa_dist.convert.cli import main as convert  # noqa: E402
from nsa_dist.convert.io import load_consolidated  # noqa: E402
from nsa_dist.models import NSADecoderLM  # noqa: E402

S = 40


def _tiny_llama(path, tie=False, **extra):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tie, **extra)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_from_hf_equals_llama_with_window_gates(tmp_path, tie):
    llama = _tiny_llama(tmp_path / "llama", tie)
    nsa_yaml = tmp_path / "nsa.yaml"
    NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=3, window=S).to_yaml(nsa_yaml)
    assert convert(["from-hf", str(tmp_path / "llama"), str(tmp_path / "nsa"), "--nsa-config", str(nsa_yaml)]) == 0
    report = (tmp_path / "nsa" / "import_report.txt").read_text()
    assert "created" in report and "gate" in report
    cfg, state = load_consolidated(str(tmp_path / "nsa"))
    model = NSADecoderLM(cfg).eval()
    model.load_state_dict(state, strict=not tie)
    with torch.no_grad():
        for layer in model.layers:  # force the window branch: w >= S makes it full attention
            layer.attn.gate.fc2.bias.copy_(torch.tensor([-60.0, -60.0, 60.0]).repeat(cfg.num_heads))
        x = torch.randint(0, 101, (1, S))
        err = (model(x).logits - llama(x).logits).abs().max().item()
    assert err < 1e-5


def test_to_hf_loads_in_transformers_and_generates(tmp_path):
    cfg = ModelConfig.from_yaml("configs/model/tiny.yaml")
    torch.manual_seed(1)
    model = NSADecoderLM(cfg).eval()
    from nsa_dist.convert.io import save_consolidated
    os.makedirs(tmp_path / "ckpt")
    save_consolidated(model.state_dict(), cfg, str(tmp_path / "ckpt"))
    assert convert(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 70))
    with torch.no_grad():
        assert (hf(x).logits - model(x).logits).abs().max() < 1e-5
        out = hf.generate(x[:, :8], max_new_tokens=4, do_sample=False)
        ours = x[:, :8]
        for _ in range(4):  # greedy decoding with our model gives the same tokens
            ours = torch.cat([ours, model(ours).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ours)


def test_conversion_refuses_bad_input_and_keeps_outputs(tmp_path, capsys):
    _tiny_llama(tmp_path / "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert convert(["from-hf", str(tmp_path / "llama"), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"
    weights = tmp_path / "llama" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncate
    assert convert(["from-hf", str(tmp_path / "llama"), str(tmp_path / "new")]) == 2
    assert "truncated" in capsys.readouterr().err and not (tmp_path / "new").exists()
    _tiny_llama(tmp_path / "biased", attention_bias=True)
    assert convert(["from-hf", str(tmp_path / "biased"), str(tmp_path / "new")]) == 2
    assert "attention_bias" in capsys.readouterr().err
    assert convert(["to-hf", str(tmp_path / "llama"), str(tmp_path / "new")]) == 2
    assert "not an nsa_dist config" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # no temporary leftovers

"""The steps right after the README's set-up, as a new user takes them (issue 26): each test
fails on the code before its fix."""
from __future__ import annotations

import pytest

from nsa_dist.config import ModelConfig


# ------------------------------------------------------------------ defect 3: a garbage tokenizer

def test_garbage_tokenizer_file_is_named(tmp_path):
    from nsa_dist.data import Tokenizer

    bad = tmp_path / "not_a_tokenizer.model"
    bad.write_bytes(b"\x8a\x01garbage that is no protobuf \xff\xfe" * 7)
    with pytest.raises(ValueError, match="not_a_tokenizer.model is not a SentencePiece model"):
        Tokenizer.load(bad)


# ------------------------------------------------------------------ defect 6: malformed YAML

def test_malformed_yaml_is_one_line_with_file_line_column(tmp_path, capsys):
    from nsa_dist.training.cli import main

    bad = tmp_path / "broken.yaml"
    bad.write_text("model: configs/model/tiny.yaml\nseq_len: [1, 2\ntrain_steps: 3\n")
    with pytest.raises(ValueError, match=r"broken\.yaml:3:12: invalid YAML"):
        ModelConfig.from_yaml(bad)
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.yaml:3:12" in err, err


def test_override_with_invalid_yaml_value_is_named():
    from nsa_dist.training.config import TrainConfig

    with pytest.raises(ValueError, match=r"override 'betas=\[0.9,': .* not a valid YAML value"):
        TrainConfig().apply_overrides(["betas=[0.9,"])


# ------------------------------------------------------------------ defect 7: overrides anywhere

@pytest.mark.parametrize("argv", [
    ["--config", "C.yaml", "--resume", "auto", "train_steps=2000", "parallel.tp=2"],
    ["train_steps=2000", "--config", "C.yaml", "parallel.tp=2", "--resume", "auto"],
    ["--local_rank=0", "--config", "C.yaml", "train_steps=2000", "--resume", "auto", "parallel.tp=2"],
])
def test_overrides_accepted_anywhere(argv):
    from nsa_dist.training.cli import parse_args

    args = parse_args(argv)
    assert (args.config, args.resume, args.overrides) == ("C.yaml", "auto", ["train_steps=2000", "parallel.tp=2"])


def test_overrides_after_resume_reach_the_config(capsys):
    import json

    from nsa_dist.training.cli import main

    assert main(["--config", "configs/train/tiny_cpu.yaml", "--resume", "auto", "train_steps=7",
                 "--print-config", "parallel.tp=2"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train_steps"] == 7 and cfg["parallel"]["tp"] == 2


def test_bench_overrides_after_options():
    from nsa_dist.training.bench import parse_args

    args = parse_args(
        ["--config", "C.yaml", "--out", "o.csv", "seq_len=64", "--layouts", "dp", "lr=1e-3"])
    assert args.overrides == ["seq_len=64", "lr=1e-3"] and args.layouts == "dp"


def test_model_overrides_change_fields_of_the_model_yaml(tmp_path):
    """model.X=V on the command line (or model_overrides in the train YAML) changes one field of
    the model YAML for this run; the rest of the YAML stays; a misspelt field is named."""
    from nsa_dist.training.bench import _derived_model_yaml
    from nsa_dist.training.config import TrainConfig

    cfg = TrainConfig(model="configs/model/1b.yaml").apply_overrides(
        ["model.nsa.shared_kv=true", "model.num_layers=2", "train_steps=3"])
    assert cfg.model == "configs/model/1b.yaml" and cfg.train_steps == 3
    assert cfg.model_overrides == {"nsa": {"shared_kv": True}, "num_layers": 2}
    mc, base = cfg.model_config(), ModelConfig.from_yaml("configs/model/1b.yaml")
    assert mc.nsa.shared_kv and mc.num_layers == 2 and not base.nsa.shared_kv
    assert (mc.hidden_size, mc.nsa.window, mc.nsa.phi) == (base.hidden_size, base.nsa.window, base.nsa.phi)
    assert TrainConfig.from_dict({"model": "configs/model/1b.yaml", "model_overrides": {"nsa": {"shared_kv": True}}}
                                 ).model_config().nsa.shared_kv
    with pytest.raises(ValueError, match=r"model_overrides\.nsa: unknown key 'sharedkv'; did you mean 'shared_kv'"):
        TrainConfig(model="configs/model/1b.yaml").apply_overrides(["model.nsa.sharedkv=true"])
    with pytest.raises(ValueError, match="model_overrides: unknown key 'num_layer'"):
        TrainConfig(model="configs/model/1b.yaml", model_overrides={"num_layer": 2})
    with pytest.raises(ValueError, match=r"model_overrides=\[2\]: must be a mapping"):
        TrainConfig(model_overrides=[2])
    # the benchmark's derived model YAML carries the overrides, then stands alone
    path = _derived_model_yaml(cfg, "dense", 128, str(tmp_path))
    derived = ModelConfig.from_yaml(path)
    assert derived.attention == "dense" and derived.nsa.shared_kv and derived.num_layers == 2
    plain = _derived_model_yaml(TrainConfig(model="configs/model/1b.yaml"), "dense", 128, str(tmp_path))
    assert plain != path and not ModelConfig.from_yaml(plain).nsa.shared_kv  # no file shared between them


def test_bench_rows_name_the_model_and_old_csvs_keep_their_columns(tmp_path):
    """The bench's CSV says which model (YAML and overrides) each row ran; appending to a CSV
    begun with fewer columns keeps that file's columns."""
    import csv

    from nsa_dist.training.bench import FIELDS, _append_row, _model_label
    from nsa_dist.training.config import TrainConfig

    cfg = TrainConfig(model="configs/model/1b.yaml").apply_overrides(["model.nsa.shared_kv=true", "model.num_layers=2"])
    assert _model_label(cfg) == "1b.yaml model.nsa.shared_kv=True model.num_layers=2"
    assert _model_label(TrainConfig(model="configs/model/1b.yaml")) == "1b.yaml"
    new, old = tmp_path / "new.csv", tmp_path / "old.csv"
    _append_row(str(new), {"attention": "nsa", "model": _model_label(cfg)})
    rows = list(csv.DictReader(open(new)))
    assert list(rows[0]) == FIELDS and rows[0]["model"] == _model_label(cfg)
    old.write_text("attention,seq_len\ndense,8\n")
    _append_row(str(old), {"attention": "nsa", "seq_len": 16, "model": "1b.yaml"})
    assert old.read_text().splitlines() == ["attention,seq_len", "dense,8", "nsa,16"]


# ------------------------------------------------------------------ defect 1: generate from consolidate --optimizer

TINY = {"vocab_size": 64, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
        "head_dim": 16, "intermediate_size": 64, "max_seq_len": 64,
        "nsa": {"cmp_block": 8, "cmp_stride": 4, "sel_block": 8, "num_selected": 3, "window": 8}}


def _consolidated_with_optimizer(out):
    """What ``nsa-convert consolidate RUN OUT --optimizer`` writes: weights, config and Adam's moments."""
    import torch

    from nsa_dist.checkpoint.tensors import save_moments
    from nsa_dist.convert.io import save_consolidated
    from nsa_dist.models import NSADecoderLM

    cfg = ModelConfig.from_dict(TINY)
    torch.manual_seed(0)
    model = NSADecoderLM(cfg)
    out.mkdir()
    state = model.state_dict()
    save_consolidated(state, cfg, str(out))
    names = [k for k in state if k != "lm_head.weight"]
    save_moments({k: torch.ones_like(state[k]) for k in names}, {k: torch.ones_like(state[k]) for k in names},
                 names, str(out / "optimizer.safetensors"))
    return cfg, model


def test_generate_reads_a_consolidated_folder_with_optimizer(tmp_path, capsys):
    import yaml

    from nsa_dist.inference import generate
    from toolbox import load_tool

    out = tmp_path / "cons"
    cfg, model = _consolidated_with_optimizer(out)
    model_yaml = tmp_path / "model.yaml"
    model_yaml.write_text(yaml.safe_dump(cfg.to_dict()))
    want = generate(model.eval(), [[1, 5, 7]], 6, stop_token=None).tokens[0]
    gen = load_tool("generate")
    for config in (["--config", str(model_yaml)], []):  # the README's form, and the folder's own config
        assert gen.main([*config, "--checkpoint", str(out), "--prompt-ids", "1,5,7",
                         "--max-new-tokens", "6"]) == 0
        printed = capsys.readouterr().out.strip().splitlines()[-1]
        assert printed == "1,5,7 | " + ",".join(map(str, want)), printed


# ------------------------------------------------------------------ defect 10: conversion without DeepSpeed

_NO_DEEPSPEED = """
import sys
from nsa_dist.convert.cli import main
rc = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m == "deepspeed" or m.startswith("deepspeed."))
print("DEEPSPEED_MODULES", loaded)
sys.exit(rc)
"""


def _convert_without_deepspeed(*argv):
    """Run ``nsa-convert argv`` in a fresh interpreter; (exit code, output, DeepSpeed modules loaded)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("DS_ACCELERATOR", None)
    out = subprocess.run([sys.executable, "-c", _NO_DEEPSPEED, *argv], capture_output=True, text=True,
                         env=env, timeout=120)
    line = [x for x in out.stdout.splitlines() if x.startswith("DEEPSPEED_MODULES")]
    return out.returncode, out.stdout + out.stderr, line[0] if line else ""


def test_deepspeed_records_read_without_importing_deepspeed(tmp_path):
    """The three DeepSpeed record classes a ZeRO file holds are read through stand-ins."""
    import os
    import subprocess
    import sys

    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(scale=1), "zero_stage": ZeroStageEnum.gradients,
                                         "frag": fragment_address(numel=6, start=2),
                                         "flat": torch.arange(6.0)}}, path)
    code = ("import sys; from nsa_dist.convert.zero_state import load_ds_file; "
            f"sd = load_ds_file({str(path)!r})['optimizer_state_dict']; "
            "print(int(sd['zero_stage']), sd['frag'].numel, sd['frag'].start, sd['flat'].tolist(), "
            "any(m.startswith('deepspeed') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "6", "2", "[0.0,", "1.0,", "2.0,", "3.0,", "4.0,", "5.0]", "False"], out.stdout
    assert "Setting accelerator" not in out.stderr


def test_to_hf_and_reshard_of_a_consolidated_folder_import_no_deepspeed(tmp_path):
    _consolidated_with_optimizer(tmp_path / "cons")
    for argv in (["to-hf", str(tmp_path / "cons"), str(tmp_path / "hf")],
                 ["reshard", str(tmp_path / "cons"), str(tmp_path / "full"), "--reset-optimizer"]):
        rc, text, loaded = _convert_without_deepspeed(*argv)
        assert rc == 0, text
        assert loaded == "DEEPSPEED_MODULES []" and "Setting accelerator" not in text, text


# ------------------------------------------------------------------ defect 2: to-hf writes a Hugging Face tokenizer

CORPUS = ["def f(x):\n\treturn x  +  1\n\n\n", "    indented\n        deeper\t\ttabs\t\n", "  two leading, trailing   ",
          "héllo wörld — ünïcödé 日本語 🤗 ∑ ß ç", "a\r\nb\rc\x0bd\x0ce", "<s> written </s> <pad> <unk> in text",
          "", " ", "\n", "\t", "12345 67.89e-10 0x1F", "x" * 300, "\u200b zero width, \u00a0 no-break"]


def test_to_hf_tokenizer_loads_with_autotokenizer_and_equals_ours(tmp_path):
    import email
    import glob
    import json as json_pkg
    import os

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")

    from nsa_dist.convert.cli import main as convert
    from nsa_dist.convert.io import save_consolidated
    from nsa_dist.data import Tokenizer
    from nsa_dist.data.tokenizer import train_tokenizer
    from nsa_dist.models import NSADecoderLM

    sources = [os.path.dirname(m.__file__) for m in (email, json_pkg)]
    train_tokenizer(sources, 1024, tmp_path / "tok", max_sentences=20000, log=lambda m: None)
    cfg = ModelConfig.from_dict({**TINY, "vocab_size": 1024})
    os.makedirs(tmp_path / "cons")
    save_consolidated(NSADecoderLM(cfg).state_dict(), cfg, str(tmp_path / "cons"))
    assert convert(["to-hf", str(tmp_path / "cons"), str(tmp_path / "hf"), "--tokenizer", str(tmp_path / "tok")]) == 0

    ours = Tokenizer.load(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    texts = CORPUS + [open(f, encoding="utf-8").read()
                      for f in sorted(glob.glob(os.path.join(sources[0], "*.py")))[:12]]
    for text in texts:
        ids = ours.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, repr(text[:80])
        assert hf(text)["input_ids"] == [ours.bos_id] + ids  # documents start with BOS, as in training
        assert hf.decode(ids) == text and hf.decode([ours.bos_id] + ids + [ours.eos_id], skip_special_tokens=True) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    # The export stays readable by our own loader (tokenizer.model beside the HF files).
    assert Tokenizer.load(tmp_path / "hf").encode(texts[0]) == ours.encode(texts[0])


# ------------------------------------------------------------------ defect 9: the README a new user follows

def test_readme_paths_exist_and_venv_and_caveats_are_said():
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    readme = open(os.path.join(root, "README.md")).read()
    made = set(re.findall(r"^cp \S+ (\S+)", readme, flags=re.M))  # files the README tells to create
    for path in set(re.findall(r"\b((?:launch|tools|configs)/[\w./-]+\.(?:sh|py|yaml|json|sbatch|example)|launch/hostfile)\b",
                               readme)):
        assert os.path.exists(os.path.join(root, path)) or path in made, f"README.md names {path}, which is not shipped"
    assert "source .venv/bin/activate" in readme and ".venv/bin/nsa-convert" in readme
    assert "9-11 minutes" not in readme
    assert re.search(r"make main.*\s+first \*\*deletes `runs/tiny_cpu`", readme, flags=re.S)
    assert re.search(r"`output_dir` must be on a file system every node sees", readme)

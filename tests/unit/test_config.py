"""NSAConfig / ModelConfig: validation, YAML round trip, unknown keys."""
import pytest
import yaml

from nsa_dist import ModelConfig, NSAConfig


@pytest.mark.parametrize("kwargs, field, rule", [
    (dict(cmp_block=30, cmp_stride=16), "cmp_block", "must divide cmp_block"),
    (dict(cmp_block=32, cmp_stride=16, sel_block=72), "sel_block", "must divide sel_block"),
    (dict(cmp_block=128, cmp_stride=16, sel_block=64), "cmp_block", "<= sel_block"),
    (dict(num_selected=2), "num_selected", ">= 3"),
    (dict(window=-1), "window", ">= 0"),
    (dict(cmp_stride=0), "cmp_stride", "positive"),
    (dict(sel_block=0), "sel_block", "positive"),
    (dict(phi="max"), "phi", "'mean' or 'mlp'"),
    (dict(num_selected=4.0), "num_selected", "positive integer"),
    (dict(shared_kv="yes"), "shared_kv", "true or false"),
])
def test_invalid_nsa_config_names_field_and_rule(kwargs, field, rule):
    with pytest.raises(ValueError) as err:
        NSAConfig(**kwargs)
    assert field in str(err.value) and rule in str(err.value)


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_heads=6, num_kv_heads=4), "num_heads"),
    (dict(head_dim=33), "head_dim"),
    (dict(attention="linear"), "attention"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(nsa=True), "nsa=True: must be a mapping"),
    (dict(rope_theta="abc"), "rope_theta='abc': must be a number"),
])
def test_invalid_model_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


def test_yaml_exponent_floats_are_numbers():
    """YAML 1.1 reads 5e5 (no dot) as a string; the float fields take it as the number."""
    assert ModelConfig(rope_theta="5e5", norm_eps="1e-6").rope_theta == 5e5


def test_yaml_round_trip(tmp_path):
    cfg = ModelConfig(hidden_size=96, num_layers=3, nsa=NSAConfig(window=0, phi="mlp"))
    path = tmp_path / "m.yaml"
    cfg.to_yaml(path)
    back = ModelConfig.from_yaml(path)
    assert back == cfg and isinstance(back.nsa, NSAConfig) and back.nsa.window == 0


def test_yaml_typo_is_named(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"hidden_size": 64, "nsa": {"windw": 8}}))
    with pytest.raises(ValueError, match=r"unknown key 'windw'.*did you mean 'window'"):
        ModelConfig.from_yaml(path)
    path.write_text(yaml.safe_dump({"num_layer": 2}))
    with pytest.raises(ValueError, match="num_layers"):
        ModelConfig.from_yaml(path)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        ModelConfig.from_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["tiny", "125m", "1b", "1b_shared_kv", "paper"])
def test_shipped_model_configs_load(name):
    cfg = ModelConfig.from_yaml(f"configs/model/{name}.yaml")
    assert cfg.num_heads % cfg.num_kv_heads == 0


def test_paper_config_shape():
    cfg = ModelConfig.from_yaml("configs/model/paper.yaml")
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dv) == (64, 4, 192, 128)
    n = cfg.nsa
    assert (n.cmp_block, n.cmp_stride, n.sel_block, n.num_selected, n.window) == (32, 16, 64, 16, 512)

"""Test helper: a model through ``nsa-convert to-hf`` and back into transformers."""
import os


def export_and_load(model, tmp_path):
    """model (an NSADecoderLM) saved, exported with to-hf and loaded by transformers
    (trust_remote_code): the export's NSADistForCausalLM, in eval mode, on model's device."""
    import transformers

    from nsa_dist.convert.cli import main as convert
    from nsa_dist.convert.io import save_consolidated

    ckpt, out = os.path.join(tmp_path, "ckpt"), os.path.join(tmp_path, "hf")
    os.makedirs(ckpt)
    save_consolidated(model.state_dict(), model.config, ckpt)  # tied weights stored once
    assert convert(["to-hf", ckpt, out]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    return hf.to(model.embed.weight.device).eval()

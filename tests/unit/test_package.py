"""Package hygiene: importing nsa_dist pulls in no optional heavy dependency."""
import subprocess
import sys

OPTIONAL = ("deepspeed", "triton", "tensorboard", "sentencepiece", "transformers")


def test_import_loads_no_optional_dependency():
    code = ("import sys, nsa_dist, nsa_dist.ops, nsa_dist.modules, nsa_dist.models, nsa_dist.convert, "
            "nsa_dist.inference, nsa_dist.data; "
            "nsa_dist.NSADecoderLM; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({OPTIONAL!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_lazy_top_level_names():
    import nsa_dist
    assert nsa_dist.NSAAttention.__name__ == "NSAAttention"
    assert nsa_dist.NSADecoderLM.__name__ == "NSADecoderLM"

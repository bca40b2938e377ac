"""Fixtures for the data tests: a small synthetic corpus, a tokenizer, and shards.

Session-scoped so sentencepiece trains once (about a second, vocab 400)."""
import random

import pytest

WORDS = ("def class return self value index data token block import from for in if else "
         "while yield lambda None True False print list dict tuple range len sum").split()


def write_corpus(root, n_files=24, seed=0):
    """n_files Python-like files (plus a subfolder and one non-ASCII file), deterministic."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    for i in range(n_files):
        lines = []
        for _ in range(rng.randint(15, 60)):
            indent = "    " * rng.randint(0, 3)
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, 8))]
            lines.append(indent + " ".join(words) + rng.choice(["", ":", "()", f" = {rng.randint(0, 999)}"]))
        folder = root / "sub" if i % 5 == 0 else root
        (folder / f"mod_{i:02d}.py").write_text("\n".join(lines) + "\n")
    (root / "notes.txt").write_text("Grüße, naïve café — 数据 ✓\n\ttabs\tand  spaces  \n")
    return root


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "code")


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_dir, tmp_path_factory):
    from nsa_dist.data.tokenizer import train_tokenizer
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([str(corpus_dir)], 400, out, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def data_prefix(corpus_dir, tokenizer_dir, tmp_path_factory):
    from nsa_dist.data.shards import preprocess_corpus
    prefix = tmp_path_factory.mktemp("shards") / "code"
    preprocess_corpus([str(corpus_dir)], tokenizer_dir, prefix, valid_fraction=0.1,
                      log=lambda m: None)
    return prefix

"""The user's path through the trainer (issue 26): each test fails on the code before its fix."""
from __future__ import annotations

import os

from conftest import check, run_pretrain, summary, train_yaml


# ------------------------------------------------------------------ defect 4: tokenizer differs from the shards'

def test_tokenizer_other_than_the_shards_is_refused(tiny_data, tmp_path):
    import json as json_pkg

    from nsa_dist.data.tokenizer import train_tokenizer

    other = tmp_path / "other_tokenizer"
    train_tokenizer([os.path.dirname(json_pkg.__file__)], 480, other, max_sentences=3000, log=lambda m: None)
    cfg = train_yaml(tiny_data, tmp_path, tokenizer=str(other), train_steps=1)
    proc = run_pretrain(cfg)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "data shards" in err and str(other) in err and tiny_data["tokenizer"] in err, err
    assert not os.path.exists(os.path.join(tmp_path, "run", "checkpoints"))

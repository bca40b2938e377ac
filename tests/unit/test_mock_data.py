"""MockDataset: random tokens behind the PackedDataset interface (throughput runs)."""
import pytest
import torch

from nsa_dist.data import MockDataset, build_dataloader


def test_samples_are_deterministic_and_in_range():
    a = MockDataset(100, 64, seed=3)
    b = MockDataset(100, 64, seed=3)
    s = a[5]
    assert torch.equal(s["input_ids"], b[5]["input_ids"])
    assert not torch.equal(s["input_ids"], a[6]["input_ids"])
    assert not torch.equal(s["input_ids"], MockDataset(100, 64, seed=3, split="valid")[5]["input_ids"])
    assert s["input_ids"].shape == (64,) and int(s["input_ids"].max()) < 100 and int(s["input_ids"].min()) >= 0
    # labels are the next token; one document per sample by default
    assert torch.equal(s["labels"][:-1], s["input_ids"][1:])
    assert s["cu_seqlens"].tolist() == [0, 64]


def test_documents_and_loader():
    ds = MockDataset(50, 40, doc_len=16)
    s = ds[0]
    assert s["cu_seqlens"].tolist() == [0, 16, 32, 40]
    assert s["labels"][15] == -100 and s["labels"][31] == -100 and s["labels"][14] != -100
    batch = next(iter(build_dataloader(ds, 2, 0, 1)))
    assert batch["input_ids"].shape == (1, 80)
    assert batch["cu_seqlens"].tolist() == [0, 16, 32, 40, 56, 72, 80]


@pytest.mark.parametrize("kw", [dict(vocab_size=1, seq_len=8), dict(vocab_size=10, seq_len=0),
                                dict(vocab_size=10, seq_len=8, doc_len=-1),
                                dict(vocab_size=10, seq_len=8, split="test")])
def test_bad_arguments_are_named(kw):
    with pytest.raises(ValueError):
        MockDataset(**kw)

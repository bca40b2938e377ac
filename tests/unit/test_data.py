"""Corpus discovery, token shards, preprocessing, PackedDataset and the resumable loader."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sentencepiece")

from toolbox import load_tool  # noqa: E402
from nsa_dist.data import (IGNORE_INDEX, PackedDataset, TokenShard, Tokenizer,  # noqa: E402
                           build_dataloader, discover_files, iter_documents, token_dtype)
from nsa_dist.data.shards import (TokenShardWriter, meta_path, preprocess_corpus,  # noqa: E402
                                  split_of)

QUIET = dict(log=lambda m: None)
ROOT = Path(__file__).resolve().parents[2]




def _docs(prefix, split):
    shard = TokenShard(f"{prefix}_{split}")
    return [shard.doc(i).tolist() for i in range(len(shard))]


# ------------------------------------------------------------------ corpus

def test_default_corpus_is_the_stdlib():
    files = discover_files(None)
    keys = [f.key for f in files]
    assert "stdlib/os.py" in keys and all(k.endswith(".py") for k in keys)
    assert not any("site-packages" in k or "__pycache__" in k for k in keys)
    assert [f.key for f in discover_files(["stdlib"])] == keys  # deterministic


def test_discovery_order_keys_and_jsonl(corpus_dir, tmp_path):
    files = discover_files([str(corpus_dir)])
    keys = [f.key for f in files]
    assert keys[0] == "code/mod_01.py" and "code/sub/mod_00.py" in keys and "code/notes.txt" in keys
    assert len(keys) == 25 and len(set(keys)) == 25
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "first doc"}\n\n{"text": "  "}\n{"text": "third", "id": 3}\n')
    docs = list(iter_documents(discover_files([str(jl), str(jl)])))  # named twice: once
    assert [(d.key, d.text) for d in docs] == [("d.jsonl#1", "first doc"), ("d.jsonl#4", "third")]
    jl.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: .*'text'"):
        list(iter_documents(discover_files([str(jl)])))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_files([str(tmp_path / "missing")])
    # A file list: @LIST names paths relative to its own folder.
    (tmp_path / "more.txt").write_text("another document")
    (tmp_path / "list.txt").write_text("# corpus\nd.jsonl\n\nmore.txt\n")
    assert [f.key for f in discover_files([f"@{tmp_path / 'list.txt'}"])] == ["d.jsonl", "more.txt"]
    with pytest.raises(FileNotFoundError, match="file list"):
        discover_files([f"@{tmp_path / 'nolist.txt'}"])


# ------------------------------------------------------------------ shard format

def test_token_dtype_by_vocab_size():
    assert token_dtype(400) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids up to 65535 fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(128256) == np.uint32
    with pytest.raises(ValueError):
        token_dtype(0)


def test_writer_reader_round_trip_and_range_check(tmp_path):
    docs = [[1, 5, 2], [1, 7, 8, 9, 2], [1, 2]]
    w = TokenShardWriter(tmp_path / "s", np.uint32)
    for d in docs:
        w.add(d)
    w.close()
    shard = TokenShard(tmp_path / "s")
    assert shard.dtype == np.uint32 and shard.num_tokens == 10
    assert [shard.doc(i).tolist() for i in range(len(shard))] == docs
    assert sorted(os.listdir(tmp_path)) == ["s.bin", "s.idx"]  # no temp files left
    w = TokenShardWriter(tmp_path / "t", np.uint16)
    with pytest.raises(ValueError, match="out of range"):
        w.add([1, 70000])
    w.abort()
    assert not (tmp_path / "t.bin").exists()


# ------------------------------------------------------------------ preprocessing

def test_preprocess_matches_direct_tokenization(corpus_dir, tokenizer_dir, data_prefix):
    tok = Tokenizer.load(tokenizer_dir)
    docs = list(iter_documents(discover_files([str(corpus_dir)])))
    expect = [tok.encode_document(d.text) for d in docs]
    train, valid = _docs(data_prefix, "train"), _docs(data_prefix, "valid")
    assert sorted(train + valid) == sorted(expect)
    assert sum(map(len, train + valid)) == sum(map(len, expect))
    # Split by seeded hash of the document key; a valid document is one the hash picked.
    picked = [e for d, e in zip(docs, expect) if split_of(d.key, 0.1, 1234)[0] == "valid"]
    assert picked and sorted(valid) == sorted(picked)
    assert TokenShard(f"{data_prefix}_train").dtype == np.uint16
    meta = json.loads(meta_path(data_prefix).read_text())
    assert meta["splits"]["valid"]["num_docs"] == len(valid)
    assert meta["tokenizer"]["sha256"] == tok.sha256


def test_preprocess_is_deterministic_across_workers(corpus_dir, tokenizer_dir, data_prefix, tmp_path):
    preprocess_corpus([str(corpus_dir)], tokenizer_dir, tmp_path / "w2", valid_fraction=0.1,
                      workers=2, **QUIET)
    for split in ("train", "valid"):
        for ext in (".bin", ".idx"):
            assert Path(f"{tmp_path / 'w2'}_{split}{ext}").read_bytes() == \
                Path(f"{data_prefix}_{split}{ext}").read_bytes()


def test_preprocess_cache_and_invalidation(corpus_dir, tokenizer_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(corpus_dir, src)
    prefix = tmp_path / "out" / "p"

    def run(**kw):
        kw = {"valid_fraction": 0.1, **QUIET, **kw}
        return preprocess_corpus([str(src)], tokenizer_dir, prefix, **kw)

    assert run()["reused"] is False
    assert run()["reused"] is True
    assert run(force=True)["reused"] is False
    assert run(seed=7)["reused"] is False  # split settings are part of the fingerprint
    (src / "new.py").write_text("def added():\n    return 1\n")
    meta = run(seed=7)
    assert meta["reused"] is False and meta["num_files"] == 26
    # Shards that no longer match the recorded counts are rebuilt, not reused.
    Path(f"{prefix}_train.bin").write_bytes(b"")
    assert run(seed=7)["reused"] is False
    assert TokenShard(f"{prefix}_train").num_tokens == meta["splits"]["train"]["num_tokens"]


def test_tiny_corpus_still_gets_a_valid_document(tokenizer_dir, tmp_path):
    src = tmp_path / "two"
    src.mkdir()
    (src / "a.txt").write_text("alpha beta")
    (src / "b.txt").write_text("gamma delta")
    meta = preprocess_corpus([str(src)], tokenizer_dir, tmp_path / "p", valid_fraction=0.01, **QUIET)
    assert meta["splits"]["train"]["num_docs"] == 1 and meta["splits"]["valid"]["num_docs"] == 1
    meta = preprocess_corpus([str(src)], tokenizer_dir, tmp_path / "p", valid_fraction=0.0, **QUIET)
    assert list(meta["splits"]) == ["train"] and meta["splits"]["train"]["num_docs"] == 2
    with pytest.raises(FileNotFoundError):  # the earlier run's valid split is gone
        TokenShard(f"{tmp_path / 'p'}_valid")


def test_empty_corpus_errors(tokenizer_dir, tmp_path, capsys):
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="empty corpus: no files"):
        preprocess_corpus([str(tmp_path / "none")], tokenizer_dir, tmp_path / "p", **QUIET)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n \n")
    (tmp_path / "blank" / "b.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="empty corpus: the 2 input file.*no text"):
        preprocess_corpus([str(tmp_path / "blank")], tokenizer_dir, tmp_path / "p", **QUIET)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("only one document")
    with pytest.raises(ValueError, match="valid split got none.*valid-fraction 0"):
        preprocess_corpus([str(tmp_path / "one")], tokenizer_dir, tmp_path / "p", **QUIET)
    assert not list(tmp_path.glob("p_*"))  # nothing half-written left behind
    tool = load_tool("preprocess_data")
    assert tool.main(["--input", str(tmp_path / "none"), "--tokenizer", str(tokenizer_dir),
                      "--output-prefix", str(tmp_path / "p")]) == 2
    assert "empty corpus" in capsys.readouterr().err


def test_cli_writes_then_reuses(corpus_dir, tokenizer_dir, tmp_path, capsys):
    tool = load_tool("preprocess_data")
    args = ["--input", str(corpus_dir), "--tokenizer", str(tokenizer_dir),
            "--output-prefix", str(tmp_path / "c"), "--valid-fraction", "0.2"]
    assert tool.main(args) == 0 and "written" in capsys.readouterr().out
    assert tool.main(args) == 0 and "reused" in capsys.readouterr().out
    for name in ("c_train.bin", "c_train.idx", "c_valid.bin", "c_valid.idx", "c_meta.json"):
        assert (tmp_path / name).is_file()


@pytest.fixture
def shard_copy(data_prefix, tmp_path):
    for split in ("train", "valid"):
        for ext in (".bin", ".idx"):
            shutil.copy(f"{data_prefix}_{split}{ext}", f"{tmp_path / 'x'}_{split}{ext}")
    return tmp_path / "x"


def test_truncated_bin_is_a_clear_error(shard_copy):
    binp = Path(f"{shard_copy}_train.bin")
    binp.write_bytes(binp.read_bytes()[:-2])
    with pytest.raises(ValueError, match="do not match") as e:
        PackedDataset(shard_copy, 16, seed=0)
    assert str(binp) in str(e.value) and f"{shard_copy}_train.idx" in str(e.value)


def test_mismatched_or_corrupt_index_is_a_clear_error(shard_copy):
    shutil.copy(f"{shard_copy}_valid.idx", f"{shard_copy}_train.idx")  # another shard's index
    with pytest.raises(ValueError, match="do not match"):
        TokenShard(f"{shard_copy}_train")
    idx = Path(f"{shard_copy}_valid.idx")
    idx.write_bytes(idx.read_bytes()[:-8])
    with pytest.raises(ValueError, match="has .* bytes, its header"):
        TokenShard(f"{shard_copy}_valid")
    idx.write_bytes(b"GARBAGE!" + idx.read_bytes()[8:])
    with pytest.raises(ValueError, match="bad magic"):
        TokenShard(f"{shard_copy}_valid")
    idx.write_bytes(b"short")
    with pytest.raises(ValueError, match="truncated"):
        TokenShard(f"{shard_copy}_valid")


def test_missing_files_are_a_clear_error(shard_copy, tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocess_data"):
        PackedDataset(tmp_path / "nothing", 16, seed=0)
    os.remove(f"{shard_copy}_train.bin")
    with pytest.raises(FileNotFoundError, match=r"x_train\.bin"):
        PackedDataset(shard_copy, 16, seed=0)


# ------------------------------------------------------------------ packed dataset

@pytest.mark.parametrize("seq_len", [7, 64, 300])
def test_samples_cut_the_stream_exactly(data_prefix, seq_len):
    ds = PackedDataset(data_prefix, seq_len, seed=0)
    shard = ds.shard
    stream = np.asarray(shard.tokens, dtype=np.int64)
    doc_of = np.repeat(np.arange(len(shard)), np.diff(shard.offsets))
    is_last = np.zeros(len(stream), bool)
    is_last[shard.offsets[1:] - 1] = True
    assert len(ds) == (len(stream) - 1) // seq_len
    assert (len(ds) - 1) * seq_len + seq_len + 1 <= len(stream)  # the last sample fits
    n_boundaries = 0
    for j in range(len(ds)):
        s = ds.sample(j)
        x, y, cu = s["input_ids"], s["labels"], s["cu_seqlens"]
        assert x.dtype == y.dtype == torch.int64 and cu.dtype == torch.int32
        a = j * seq_len
        assert x.tolist() == stream[a:a + seq_len].tolist()
        # labels: the next token, or -100 exactly where the next token starts another document
        expect = np.where(is_last[a:a + seq_len], IGNORE_INDEX, stream[a + 1:a + seq_len + 1])
        assert y.tolist() == expect.tolist()
        cu = cu.tolist()
        assert cu[0] == 0 and cu[-1] == seq_len and all(p < q for p, q in zip(cu, cu[1:]))
        for p, q in zip(cu, cu[1:]):
            piece = doc_of[a + p:a + q]
            assert (piece == piece[0]).all()  # each piece lies in one document
            if q < seq_len:  # a piece ends where its document ends
                assert y[q - 1] == IGNORE_INDEX and doc_of[a + q] != piece[0]
        n_boundaries += len(cu) - 2
    assert n_boundaries > 0  # the check above ran on real document edges


def test_packing_rules_on_a_handmade_shard(tmp_path):
    w = TokenShardWriter(tmp_path / "h_train", np.uint16)
    for d in ([1, 10, 11, 2], [1, 12, 2], [1, 13, 14, 15, 2]):  # stream of 12 tokens
        w.add(d)
    w.close()
    ds = PackedDataset(tmp_path / "h", 4, seed=0)
    assert len(ds) == 2  # (12 - 1) // 4: a third sample would need a 13th token
    got = [{k: v.tolist() for k, v in ds.sample(j).items()} for j in range(2)]
    assert got[0] == {"input_ids": [1, 10, 11, 2], "labels": [10, 11, 2, -100], "cu_seqlens": [0, 4]}
    assert got[1] == {"input_ids": [1, 12, 2, 1], "labels": [12, 2, -100, 13],
                      "cu_seqlens": [0, 3, 4]}


def test_sample_order_is_a_seeded_permutation(data_prefix):
    ds = PackedDataset(data_prefix, 32, seed=5)
    perm = ds.permutation(0)
    assert sorted(perm.tolist()) == list(range(len(ds)))
    assert perm.tolist() != list(range(len(ds)))
    assert torch.equal(ds[3]["input_ids"], ds.sample(int(perm[3]))["input_ids"])
    assert (PackedDataset(data_prefix, 32, seed=5).permutation(0) == perm).all()
    assert not (PackedDataset(data_prefix, 32, seed=6).permutation(0) == perm).all()
    assert not (ds.permutation(1) == perm).all()
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="fewer than seq_len"):
        PackedDataset(data_prefix, 10 ** 9, seed=0)


# ------------------------------------------------------------------ loader

def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_micro_batch_packs_samples(data_prefix):
    ds = PackedDataset(data_prefix, 32, seed=1)
    loader = build_dataloader(ds, micro_batch_size=3, dp_rank=1, dp_world_size=2)
    batch = _take(loader, 1)[0]
    ids = loader.sample_ids(0)
    assert ids == [int(ds.permutation(0)[g]) for g in (3, 4, 5)]  # rank 1 of round 0
    assert batch["input_ids"].shape == batch["labels"].shape == (1, 96)
    parts = [ds.sample(j) for j in ids]
    assert torch.equal(batch["input_ids"][0], torch.cat([p["input_ids"] for p in parts]))
    assert torch.equal(batch["labels"][0], torch.cat([p["labels"] for p in parts]))
    expect_cu = [0]
    for k, p in enumerate(parts):
        expect_cu += [c + 32 * k for c in p["cu_seqlens"][1:].tolist()]
    assert batch["cu_seqlens"].tolist() == expect_cu and batch["cu_seqlens"].dtype == torch.int32
    assert loader.consumed_samples == 6


@pytest.mark.parametrize("b,world", [(1, 1), (2, 2), (3, 4)])
def test_resume_gives_exactly_the_batches_that_follow(data_prefix, b, world):
    ds = PackedDataset(data_prefix, 16, seed=3)
    n, k = 2 * len(ds) // (b * world) + 3, 5  # runs past an epoch end
    for rank in range(world):
        straight = _take(build_dataloader(ds, b, rank, world), n)
        first = build_dataloader(ds, b, rank, world)
        head = _take(first, k)
        resumed = build_dataloader(ds, b, rank, world, consumed_samples=first.consumed_samples)
        tail = _take(resumed, n - k)
        for x, y in zip(straight, head + tail):
            assert all(torch.equal(x[key], y[key]) for key in x)
        again = build_dataloader(ds, b, rank, world)
        again.load_state_dict(first.state_dict())
        assert torch.equal(next(iter(again))["input_ids"], tail[0]["input_ids"])


def test_dp_ranks_are_disjoint_and_cover_each_epoch(data_prefix):
    ds = PackedDataset(data_prefix, 16, seed=3)
    b, world = 2, 3
    rounds = len(ds) // (b * world)
    loaders = [build_dataloader(ds, b, r, world) for r in range(world)]
    seen = [j for c in range(0, rounds * b * world, b * world)
            for ld in loaders for j in ld.sample_ids(c)]
    assert len(seen) == len(set(seen)) == rounds * b * world  # no sample twice in an epoch
    # Two full epochs (one rank, b=1): each covers every sample once, in a new order.
    ld = build_dataloader(ds, 1, 0, 1)
    e0 = [ld.sample_ids(g)[0] for g in range(len(ds))]
    e1 = [ld.sample_ids(g)[0] for g in range(len(ds), 2 * len(ds))]
    assert sorted(e0) == sorted(e1) == list(range(len(ds))) and e0 != e1
    assert e1 == ds.permutation(1).tolist()  # epoch e uses the (seed, e) permutation


def test_finite_loader_and_bad_arguments(data_prefix):
    ds = PackedDataset(data_prefix, 16, seed=3, split="valid")
    ld = build_dataloader(ds, 2, 0, 2, num_epochs=1)
    n = len(ld)
    assert n == len(ds) // 4 and len(list(ld)) == n and len(ld) == 0
    with pytest.raises(ValueError, match="multiple"):
        build_dataloader(ds, 2, 0, 2, consumed_samples=6)
    with pytest.raises(ValueError, match="dp_rank"):
        build_dataloader(ds, 2, 2, 2)
    with pytest.raises(ValueError, match="seed"):
        build_dataloader(ds, 2, 0, 2).load_state_dict({"consumed_samples": 4, "seed": 99})
    with pytest.raises(TypeError):
        len(build_dataloader(ds, 2, 0, 2))


def test_data_package_imports_lazily():
    import subprocess
    import sys
    code = ("import sys, nsa_dist.data as d; d.discover_files; d.TokenShard; d.preprocess_corpus; "
            "print(sorted(m for m in ('torch', 'sentencepiece') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "[]"  # preprocessing workers need neither torch nor more


@pytest.mark.slow
def test_stdlib_pipeline_end_to_end(tmp_path):
    """The main job's data path on the real default corpus: tokenizer (vocab 8192) + shards."""
    import time
    from nsa_dist.data import train_tokenizer
    t0 = time.time()
    train_tokenizer(None, 8192, tmp_path / "tok", **QUIET)
    t_tok = time.time() - t0
    meta = preprocess_corpus(None, tmp_path / "tok", tmp_path / "stdlib", workers=2, **QUIET)
    assert meta["dtype"] == "uint16" and meta["splits"]["valid"]["num_docs"] > 0
    assert t_tok < 60, f"tokenizer training took {t_tok:.0f}s"
    assert preprocess_corpus(None, tmp_path / "tok", tmp_path / "stdlib", **QUIET)["reused"]
    tok = Tokenizer.load(tmp_path / "tok")
    text = Path(discover_files(None)[0].path).read_text(encoding="utf-8", errors="replace")
    assert tok.decode(tok.encode(text)) == text
    ds = PackedDataset(tmp_path / "stdlib", 256, seed=1234)
    assert len(ds) == (meta["splits"]["train"]["num_tokens"] - 1) // 256

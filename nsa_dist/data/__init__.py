"""Data: tokenizer, corpus discovery, token shards, packed dataset, resumable loader.

Names load on first use, so that e.g. preprocessing workers never import torch and
``import nsa_dist.data`` imports nothing heavy (sentencepiece only when a tokenizer is used).
"""
import importlib

_NAMES = {
    "Tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
    "discover_files": "corpus", "iter_documents": "corpus", "stdlib_dir": "corpus",
    "TokenShard": "shards", "TokenShardWriter": "shards", "token_dtype": "shards",
    "preprocess_corpus": "shards",
    "PackedDataset": "packed", "IGNORE_INDEX": "packed", "MockDataset": "mock",
    "build_dataloader": "loader", "ResumableLoader": "loader",
}


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_NAMES)

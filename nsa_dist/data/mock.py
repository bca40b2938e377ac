"""Random-token samples for throughput runs (Megatron's ``--mock-data``): no tokenizer, no
shards, the same sample interface as ``PackedDataset`` so the loader and trainer run unchanged.

Sample ``j`` is a pure function of ``(seed, split, j)``: tokens uniform in ``[0, vocab_size)``.
Each sample is one document by default (``doc_len=0``), which is the case long-context
throughput is about; ``doc_len > 0`` cuts it into documents of that length (the last may be
shorter) to exercise packed ``cu_seqlens``.
"""
from __future__ import annotations

import numpy as np
import torch

from nsa_dist.data.packed import IGNORE_INDEX

_SPLIT_SALT = {"train": 0, "valid": 1}


class MockDataset:
    """``ds[i] -> {"input_ids": LongTensor [S], "labels": LongTensor [S], "cu_seqlens": IntTensor}``."""

    def __init__(self, vocab_size: int, seq_len: int, num_samples: int = 1 << 20, seed: int = 1234,
                 split: str = "train", doc_len: int = 0):
        if vocab_size < 2 or seq_len < 1 or num_samples < 1 or doc_len < 0:
            raise ValueError(f"MockDataset needs vocab_size >= 2, seq_len >= 1, num_samples >= 1, "
                             f"doc_len >= 0; got {vocab_size}, {seq_len}, {num_samples}, {doc_len}")
        if split not in _SPLIT_SALT:
            raise ValueError(f"split must be one of {sorted(_SPLIT_SALT)}, got {split!r}")
        self.vocab_size, self.seq_len, self.num_samples = int(vocab_size), int(seq_len), int(num_samples)
        self.seed, self.split, self.doc_len = int(seed), split, int(doc_len)

    def __len__(self) -> int:
        return self.num_samples

    def sample_arrays(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sample j as numpy: input_ids int64 [S], labels int64 [S], cu_seqlens int32 [k+1]."""
        if not 0 <= j < self.num_samples:
            raise IndexError(f"sample {j} out of range [0, {self.num_samples})")
        S = self.seq_len
        rng = np.random.default_rng([self.seed, _SPLIT_SALT[self.split], int(j)])
        window = rng.integers(0, self.vocab_size, S + 1, dtype=np.int64)
        labels = window[1:].copy()
        if self.doc_len and self.doc_len < S:
            starts = np.arange(self.doc_len, S, self.doc_len)
            labels[starts - 1] = IGNORE_INDEX  # the next token starts another document
            cu = np.concatenate([[0], starts, [S]])
        else:
            cu = np.array([0, S])
        return window[:-1], labels, cu.astype(np.int32)

    def sample(self, j: int) -> dict[str, torch.Tensor]:
        input_ids, labels, cu = self.sample_arrays(j)
        return {"input_ids": torch.from_numpy(input_ids.copy()), "labels": torch.from_numpy(labels),
                "cu_seqlens": torch.from_numpy(cu)}

    def permutation(self, epoch: int = 0, seed: int | None = None) -> np.ndarray:
        # Samples are already random; the identity order avoids a 1M-entry shuffle per epoch.
        return np.arange(self.num_samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        return self.sample(i % self.num_samples)

    def __repr__(self) -> str:
        return (f"MockDataset(vocab_size={self.vocab_size}, seq_len={self.seq_len}, split={self.split!r}, "
                f"doc_len={self.doc_len})")

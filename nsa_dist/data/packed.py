"""Fixed-length samples cut from the concatenated documents of a shard.

Stream: the split's documents back to back, tokens ``t[0 .. T-1]`` (each document is
[BOS] ... [EOS]). Raw sample ``j`` (``0 <= j < N = (T - 1) // S``) reads the window
``t[j*S : j*S + S + 1]``: ``input_ids = window[:-1]``, ``labels = window[1:]``. The last
partial window is dropped, so every label is a real token of the stream (consecutive
samples share one token: the last label of one is the first input of the next).

``labels[p] = -100`` exactly where token ``j*S + p`` is the last token of its document
(its next token is the next document's BOS). ``cu_seqlens`` (int32, FlashAttention
convention) cuts the sample at every document start strictly inside it:
``[0, s_1 - j*S, ..., S]``, so each piece lies in one document and attention never
crosses one. The first piece may continue a document begun in an earlier sample.

Order: ``ds[i]`` is raw sample ``sample_permutation(N, seed, 0)[i]``; the loader uses
epoch ``e``'s permutation for its e-th pass.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from nsa_dist.data.shards import TokenShard

IGNORE_INDEX = -100


def sample_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Permutation of range(num_samples) for (seed, epoch): numpy PCG64 seeded with both."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_samples)


class PackedDataset:
    """Samples of ``seq_len`` tokens from shard ``{data_prefix}_{split}``.

    ``ds[i] -> {"input_ids": LongTensor [S], "labels": LongTensor [S],
    "cu_seqlens": IntTensor [k+1]}`` (see the module docstring for the exact rules).
    """

    def __init__(self, data_prefix: str | os.PathLike, seq_len: int, seed: int = 1234,
                 split: str = "train"):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.shard = TokenShard(f"{data_prefix}_{split}")
        self.data_prefix, self.split = str(data_prefix), split
        self.seq_len, self.seed = int(seq_len), int(seed)
        self.num_samples = (self.shard.num_tokens - 1) // self.seq_len
        if self.num_samples == 0:
            raise ValueError(
                f"split {split!r} of {data_prefix} has {self.shard.num_tokens} tokens, fewer "
                f"than seq_len + 1 = {seq_len + 1}: not one sample; use a shorter seq_len or "
                f"more data")
        self._perm0: np.ndarray | None = None

    def __len__(self) -> int:
        return self.num_samples

    def sample_arrays(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw (unshuffled) sample j as numpy: input_ids int64 [S], labels int64 [S],
        cu_seqlens int32 [k+1]."""
        if not 0 <= j < self.num_samples:
            raise IndexError(f"sample {j} out of range [0, {self.num_samples})")
        S, start = self.seq_len, j * self.seq_len
        window = np.asarray(self.shard.tokens[start:start + S + 1], dtype=np.int64)
        input_ids, labels = window[:-1], window[1:].copy()
        offs = self.shard.offsets
        # Document starts e with start < e <= start + S: token e-1 ends a document.
        lo = np.searchsorted(offs, start, side="right")
        hi = np.searchsorted(offs, start + S, side="right")
        starts = offs[lo:hi] - start
        labels[starts - 1] = IGNORE_INDEX
        inner = starts[starts < S]
        cu = np.concatenate([[0], inner, [S]]).astype(np.int32)
        return input_ids, labels, cu

    def sample(self, j: int) -> dict[str, torch.Tensor]:
        """Raw (unshuffled) sample j as tensors."""
        input_ids, labels, cu = self.sample_arrays(j)
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "cu_seqlens": torch.from_numpy(cu)}

    def permutation(self, epoch: int = 0, seed: int | None = None) -> np.ndarray:
        """Order of raw samples in pass ``epoch`` (``seed`` defaults to the dataset's)."""
        return sample_permutation(self.num_samples, self.seed if seed is None else seed, epoch)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        if self._perm0 is None:
            self._perm0 = self.permutation(0)
        return self.sample(int(self._perm0[i]))

    def __repr__(self) -> str:
        return (f"PackedDataset({self.data_prefix!r}, split={self.split!r}, seq_len={self.seq_len},"
                f" samples={self.num_samples}, docs={self.shard.num_docs}, "
                f"tokens={self.shard.num_tokens})")

"""Resumable micro-batch loader over a PackedDataset, Megatron-style.

Global order. All ranks walk one global sequence of sample slots ``g = 0, 1, 2, ...``;
slot ``g`` is raw sample ``perm_e[g % N]`` with ``e = g // N`` and ``perm_e =
ds.permutation(e, seed)``: a fresh shuffle every pass over the data.

Round. One micro-batch step of all DP ranks together takes ``b * W`` consecutive slots
(b = micro_batch_size, W = dp_world_size). With ``c`` slots consumed before the round,
rank ``r`` takes slots ``c + r*b ... c + r*b + b - 1``; then ``c += b * W``. Ranks are
disjoint, and resuming from ``consumed_samples = c`` gives exactly the batches that would
have followed (it must be a multiple of ``b * W``, which it always is for a trainer that
counts ``steps * global_batch``).

A micro-batch packs its b samples into one row (batch 1): ``input_ids [1, b*S]``,
``labels [1, b*S]`` and ``cu_seqlens`` int32 holding every sample's document pieces,
shifted by the sample's position, so no attention crosses a sample or document edge.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from nsa_dist.data.packed import PackedDataset


class ResumableLoader:
    """Iterable of packed micro-batches for one DP rank; see the module docstring.

    ``consumed_samples`` (global count) counts the batches already handed out, the one
    just yielded included; save it (or ``state_dict()``) in the checkpoint.
    With ``num_epochs`` set, iteration stops before the first round that would need a slot
    past ``num_epochs * len(ds)`` (all ranks stop together); otherwise it never ends.
    """

    def __init__(self, ds: PackedDataset, micro_batch_size: int, dp_rank: int,
                 dp_world_size: int, consumed_samples: int = 0, seed: int | None = None,
                 num_epochs: int | None = None):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if dp_world_size < 1 or not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"need 0 <= dp_rank < dp_world_size, got dp_rank={dp_rank}, "
                             f"dp_world_size={dp_world_size}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        self.ds = ds
        self.micro_batch_size, self.dp_rank, self.dp_world_size = (
            int(micro_batch_size), int(dp_rank), int(dp_world_size))
        self.seed = ds.seed if seed is None else int(seed)
        self.num_epochs = num_epochs
        self._perm_epoch, self._perm = -1, None
        self.consumed_samples = 0
        self.set_consumed_samples(consumed_samples)

    @property
    def samples_per_round(self) -> int:
        """Slots taken by one micro-batch step of all DP ranks: b * W."""
        return self.micro_batch_size * self.dp_world_size

    def set_consumed_samples(self, consumed_samples: int) -> None:
        if consumed_samples < 0 or consumed_samples % self.samples_per_round:
            raise ValueError(
                f"consumed_samples={consumed_samples} must be a non-negative multiple of "
                f"micro_batch_size * dp_world_size = {self.samples_per_round}")
        self.consumed_samples = int(consumed_samples)

    def _raw_index(self, g: int) -> int:
        n = len(self.ds)
        epoch = g // n
        if epoch != self._perm_epoch:  # one permutation in memory at a time
            self._perm, self._perm_epoch = self.ds.permutation(epoch, self.seed), epoch
        return int(self._perm[g % n])

    def sample_ids(self, consumed_samples: int) -> list[int]:
        """Raw sample ids this rank gets in the round that starts at ``consumed_samples``."""
        first = consumed_samples + self.dp_rank * self.micro_batch_size
        return [self._raw_index(g) for g in range(first, first + self.micro_batch_size)]

    def batch(self, consumed_samples: int) -> dict[str, torch.Tensor]:
        """This rank's micro-batch of the round starting at ``consumed_samples``:
        input_ids [1, b*S], labels [1, b*S] (int64), cu_seqlens [K+1] (int32)."""
        S = self.ds.seq_len
        ids, labs, cus = [], [], [np.zeros(1, dtype=np.int32)]
        for k, j in enumerate(self.sample_ids(consumed_samples)):
            x, y, cu = self.ds.sample_arrays(j)
            ids.append(x)
            labs.append(y)
            cus.append(cu[1:] + k * S)
        return {"input_ids": torch.from_numpy(np.concatenate(ids))[None],
                "labels": torch.from_numpy(np.concatenate(labs))[None],
                "cu_seqlens": torch.from_numpy(np.concatenate(cus))}

    def __len__(self) -> int:
        """Micro-batches left for this rank (only with num_epochs)."""
        if self.num_epochs is None:
            raise TypeError("an endless loader (num_epochs=None) has no length")
        total = self.num_epochs * len(self.ds)
        return max(0, (total - self.consumed_samples) // self.samples_per_round)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        limit = None if self.num_epochs is None else self.num_epochs * len(self.ds)
        while limit is None or self.consumed_samples + self.samples_per_round <= limit:
            c = self.consumed_samples
            self.consumed_samples = c + self.samples_per_round
            yield self.batch(c)

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed,
                "micro_batch_size": self.micro_batch_size, "dp_world_size": self.dp_world_size,
                "seq_len": self.ds.seq_len, "num_samples": len(self.ds)}

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``; the seed and dataset must be the same ones (a
        different micro_batch_size or world size is fine when consumed_samples divides)."""
        for key, mine in (("seed", self.seed), ("seq_len", self.ds.seq_len),
                          ("num_samples", len(self.ds))):
            if key in state and state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]}, this loader {mine}: "
                                 f"resuming would not continue the same sample order")
        self.set_consumed_samples(int(state["consumed_samples"]))


def build_dataloader(ds: PackedDataset, micro_batch_size: int, dp_rank: int, dp_world_size: int,
                     consumed_samples: int = 0, seed: int | None = None,
                     num_epochs: int | None = None) -> ResumableLoader:
    """Packed micro-batches for DP rank ``dp_rank``; resumes exactly from ``consumed_samples``
    (global count, a multiple of micro_batch_size * dp_world_size). ``seed`` defaults to the
    dataset's. See the module docstring for the sample order."""
    return ResumableLoader(ds, micro_batch_size, dp_rank, dp_world_size, consumed_samples,
                           seed, num_epochs)

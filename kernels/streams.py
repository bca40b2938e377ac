"""A second CUDA stream for one NSA call (``LaunchConfig.overlap_branches``).

The selected branch's kernels at small GQA groups are bound by memory traffic and latency
(per-slot partial results, gathered rows, a work list built from ~90 small ops), the
compressed and window kernels by the matrix units. On two streams the GPU can run one beside
the other instead of one after the other. ``Overlap`` forks a side stream off the current
one, runs blocks of launches on it, and joins it back. Inactive (the setting off, or a CPU),
every method is a no-op: the caller issues the same launches in the same order, and they run
on the current stream one after the other.

Memory (the caching allocator returns a freed block to the pool of the stream that allocated
it, and reuses it for that stream's later allocations only): tensors the side stream writes
and the main stream reads are allocated on the main stream before the fork; a tensor the side
stream allocates and that outlives the join is handed over (``hand_over``: the allocator then
also waits for the main stream's use); the main stream joins the side stream before anything
the side stream reads can be freed. Tile tables are built before the fork (one first built
while forked makes the host wait for its copy: ``nsa.Geometry._table``). One main stream per
device is assumed: the side stream of a device is shared by every call on it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

_SIDE: dict = {}  # (device index, priority) -> the side stream, made once


def side_stream(device: torch.device, priority: int = 0) -> "torch.cuda.Stream":
    """The side stream of ``device`` with CUDA ``priority`` (0 normal, -1 high), made once."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    key = (index, priority)
    if key not in _SIDE:
        _SIDE[key] = torch.cuda.Stream(device=index, priority=priority)
    return _SIDE[key]


class Overlap:
    """Fork / join of a side stream for one call's kernels (see the module's docstring).

    geo: the call's ``nsa.Geometry`` (its launch config says whether to overlap; its
    ``forked`` flag makes a tile table first built while forked wait for its copy);
    device: the inputs' device; enabled: the caller's own condition (e.g. there is a window
    branch to overlap with)."""

    def __init__(self, geo, device: torch.device, enabled: bool = True):
        self.geo = geo
        self.active = bool(enabled and geo.launch.overlap_branches and torch.device(device).type == "cuda")
        self.main: Optional["torch.cuda.Stream"] = None
        self.side: Optional["torch.cuda.Stream"] = None
        self._forked = False
        if self.active:
            self.main = torch.cuda.current_stream(device)
            self.side = side_stream(device, geo.launch.side_priority)

    def fork(self) -> None:
        """Start the side stream after everything queued on the main stream so far."""
        if self.active:
            self.side.wait_stream(self.main)
            self.geo.forked = self._forked = True

    @contextmanager
    def on_side(self, after: Optional["torch.cuda.Event"] = None) -> Iterator[None]:
        """Launch the body's kernels on the side stream (after ``after``, an event of the
        main stream, when given); inactive: on the current stream."""
        if not self.active:
            yield
            return
        with torch.cuda.stream(self.side):
            if after is not None:
                self.side.wait_event(after)
            yield

    def mark(self) -> Optional["torch.cuda.Event"]:
        """An event after the main stream's work queued so far (None when inactive)."""
        if not self.active:
            return None
        event = torch.cuda.Event()
        event.record(self.main)
        return event

    def hand_over(self, *tensors) -> None:
        """Tensors the side stream allocated that outlive the join: their memory is reused
        only after the main stream's work queued on them too (``Tensor.record_stream``)."""
        if self.active:
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    t.record_stream(self.main)

    def join(self) -> None:
        """The main stream waits for the side stream's work; the call is one stream again."""
        if self._forked:
            self.main.wait_stream(self.side)
            self.geo.forked = self._forked = False

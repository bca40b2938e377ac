"""Bookkeeping of the NSA kernels in plain torch ops: tile tables, selection unions, the inverted selection.

Every kernel works on the packed layout (batch 1, documents concatenated; a plain batch of B
sequences is B documents). A *tile table* is an int64 tensor [num_tiles, 5] with columns
(a0, a1, doc_start, doc_end, c_start): the tile covers indices a0..a1-1 (tokens, or compressed
tokens for the compressed keys' table) of one document whose tokens are doc_start..doc_end-1 and
whose compressed tokens start at c_start. Tiles never cross a document boundary, so a kernel
program sees one document and needs no per-row document lookups.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from nsa_dist.ops.blocks import to_device

COLS = 5


def tile_table(starts: torch.Tensor, ends: torch.Tensor, doc_start: torch.Tensor,
               doc_end: torch.Tensor, c_start: torch.Tensor, size: int) -> torch.Tensor:
    """Split each range [starts[i], ends[i]) into tiles of ``size``: LongTensor [num_tiles, 5]."""
    lens = (ends - starts).clamp(min=0)
    ntiles = (lens + size - 1) // size
    total = int(ntiles.sum())
    if total == 0:
        return torch.zeros(0, COLS, dtype=torch.int64, device=starts.device)
    doc = torch.repeat_interleave(torch.arange(len(lens), device=starts.device), ntiles)
    first = torch.cumsum(ntiles, 0) - ntiles
    k = torch.arange(total, device=starts.device) - first[doc]
    a0 = starts[doc] + k * size
    a1 = torch.minimum(a0 + size, ends[doc])
    return torch.stack([a0, a1, doc_start[doc], doc_end[doc], c_start[doc]], dim=1).contiguous()


@dataclass
class Layout:
    """Document geometry of one packed call.

    cu: [N+1] token offsets and ccu: [N+1] compressed-token offsets, int64 on the CPU (tile
    tables are built from them on the host, with no GPU sync); tok_doc_start / tok_doc_end:
    [T] int64 on the inputs' device, the start / end of each token's document.
    """
    cu: torch.Tensor
    ccu: torch.Tensor
    tok_doc_start: torch.Tensor
    tok_doc_end: torch.Tensor

    @property
    def total(self) -> int:
        return int(self.tok_doc_start.numel())

    @property
    def device(self) -> torch.device:
        return self.tok_doc_start.device

    def query_tiles(self, size: int) -> torch.Tensor:
        """Tiles of ``size`` query positions within documents (on the layout's device)."""
        s, e = self.cu[:-1], self.cu[1:]
        return to_device(tile_table(s, e, s, e, self.ccu[:-1], size), self.device)

    def first_block_tiles(self, size: int, sel_block: int) -> torch.Tensor:
        """Tiles of ``size`` positions covering each document's selection block 0."""
        s, e = self.cu[:-1], self.cu[1:]
        return to_device(tile_table(s, torch.minimum(s + sel_block, e), s, e, self.ccu[:-1], size), self.device)

    def cmp_key_tiles(self, size: int) -> torch.Tensor:
        """Tiles of ``size`` compressed tokens within documents (a0/a1 index compressed tokens)."""
        s, e = self.cu[:-1], self.cu[1:]
        return to_device(tile_table(self.ccu[:-1], self.ccu[1:], s, e, self.ccu[:-1], size), self.device)


def make_layout(cu_seqlens, ccu, device=None) -> Layout:
    """Layout from token offsets ``cu_seqlens`` and compressed offsets ``ccu`` ([N+1] each:
    tensors or int lists), built on the host and moved to ``device`` (default: the CPU)."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int64).cpu()
    ccu = torch.as_tensor(ccu, dtype=torch.int64).cpu()
    lens = cu[1:] - cu[:-1]
    tok_start = to_device(torch.repeat_interleave(cu[:-1], lens), device or "cpu")
    tok_end = to_device(torch.repeat_interleave(cu[1:], lens), device or "cpu")
    return Layout(cu, ccu, tok_start, tok_end)


def selection_union(idx: torch.Tensor, tiles: torch.Tensor, span: int):
    """Union of the blocks chosen by the positions of each query tile.

    idx: [T, H, n] local block indices (-1 padded); tiles: query tile table of ``span``
    positions. Returns (union int32 [num_tiles, H, span*n] ascending then -1, count int32
    [num_tiles, H]). With span 1 the union is the position's own list.
    """
    T, H, n = idx.shape
    if span == 1:
        return idx.to(torch.int32).contiguous(), (idx >= 0).sum(-1).to(torch.int32).contiguous()
    nt = tiles.shape[0]
    pos = tiles[:, 0:1] + torch.arange(span, device=idx.device)[None, :]
    inside = pos < tiles[:, 1:2]
    u = idx[pos.clamp(max=max(T - 1, 0))]  # [nt, span, H, n]
    big = torch.iinfo(torch.int32).max
    u = torch.where(inside[:, :, None, None] & (u >= 0), u, big).to(torch.int32)
    u = u.permute(0, 2, 1, 3).reshape(nt, H, span * n)
    u = torch.sort(u, dim=-1).values
    dup = torch.zeros_like(u, dtype=torch.bool)
    dup[..., 1:] = u[..., 1:] == u[..., :-1]
    u = torch.sort(torch.where(dup, big, u), dim=-1).values
    cnt = (u != big).sum(-1).to(torch.int32)
    u = torch.where(u == big, -1, u)
    return u.contiguous(), cnt.contiguous()


class SelWork(NamedTuple):
    """The inverted selection: the work list of the block-major selected kernels.

    items: int64 [num_items, 5] = (head, key_start, key_end, list_offset, list_len);
    queries: int64 [T * H * n] global positions and slots: int32 [T * H * n] where each choice
    sits in its position's sorted list, grouped by (chunk, head, block), ascending positions
    (the unlisted ones last, never referenced); bounds: the items of position chunk c are
    items[bounds[c]:bounds[c + 1]] (a host list of upper bounds: the rows past a chunk's last
    item are padding, (0, 0, 0, 0, 0), an empty key range with no queries); chunk: positions
    per chunk; valid: uint8 [T, H, n], 1 where slot j of (position, head) is listed (a
    per-slot result there is written; the other slots are never touched).
    """
    items: torch.Tensor
    queries: torch.Tensor
    slots: torch.Tensor
    bounds: list
    chunk: int
    valid: torch.Tensor


def item_bound(positions: int, H: int, n: int, sel_block: int, seg: int, T: int, ndocs: int) -> int:
    """The most work items ``positions`` positions can make (host arithmetic, no sync).

    A (head, block) list of c queries makes ceil(c / seg) <= 1 + (c - 1) // seg segments, so
    the items are at most lists + listed // seg (``list_bound`` lists).
    """
    return list_bound(positions, H, n, sel_block, T, ndocs) + positions * H * n // seg


def list_bound(positions: int, H: int, n: int, sel_block: int, T: int, ndocs: int) -> int:
    """The most (head, block) lists ``positions`` positions can make: no more than their
    ``positions * H * n`` choices, nor than ``H * (T // sel_block + ndocs)`` distinct (head,
    block) pairs (a document of length L has ceil(L / sel_block) blocks)."""
    return min(positions * H * n, H * (T // sel_block + ndocs))


def inverted_selection(idx: torch.Tensor, layout: Layout, sel_block: int, seg: int,
                       chunk: Optional[int] = None, rows_sorted: bool = False,
                       skip_forced: bool = False, compiled: bool = False) -> SelWork:
    """Which queries chose each KV block, per chunk of ``chunk`` positions (default: one chunk).

    idx: [T, H, n] local block indices (-1 padded). Each (chunk, KV head, block) list of
    queries is cut into segments of at most ``seg`` positions. ``rows_sorted``: every row of
    idx already holds distinct blocks in ascending order, -1 last (the selection kernel's
    output), so the per-row sort is skipped.

    No host sync and no copy from the host: every shape comes from bounds known before the
    data (``item_bound``, ``list_bound``), so the host keeps queueing kernels while the GPU
    builds the list. The listed (position, head, slot) triples are sorted by (chunk, head,
    block start), stable, so positions ascend within a list. The lists are then found by
    binary search over the running count of list starts, and each padded item row by binary
    search over the running count of segments, so only the sort and two scans touch every
    choice. Items, queries and bounds are the same with or without ``rows_sorted``. Slot
    numbers and ``valid`` follow the row order used (the sort puts -1 first, the kernel's
    rows have it last); the kernels only need them to agree with each other.
    ``skip_forced``: leave out each position's forced blocks (0, and the local blocks
    floor(t/l') - 1 and floor(t/l'), t local to the document), which the range kernels run.
    ``compiled``: build the lists through ``torch.compile`` (``_device_lists``: about 90
    small torch ops become a few fused kernels, once per shape; the same integers).
    """
    T, H, n = idx.shape
    dev = idx.device
    chunk = max(1, T if chunk is None else min(chunk, T))
    nchunks = -(-T // chunk) if T else 0
    ndocs = layout.cu.numel() - 1
    sizes = [min(chunk, T - c * chunk) for c in range(nchunks)]  # positions per chunk
    bounds = [0]
    for p in sizes:
        bounds.append(bounds[-1] + item_bound(p, H, n, sel_block, seg, T, ndocs))
    if T * H * n == 0:
        valid8 = torch.zeros(T, H, n, dtype=torch.uint8, device=dev)
        return SelWork(torch.zeros(bounds[-1], 5, dtype=torch.int64, device=dev),
                       torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, dtype=torch.int32, device=dev),
                       bounds, chunk, valid8)
    nruns = sum(list_bound(p, H, n, sel_block, T, ndocs) for p in sizes) + 1
    build = _compiled_device_lists() if compiled else _device_lists
    items, queries, slots, valid8 = build(idx, layout.tok_doc_start, layout.tok_doc_end, sel_block, seg, chunk,
                                          nchunks, bounds[1], bounds[-1], nruns, rows_sorted, skip_forced)
    return SelWork(items, queries, slots, bounds, chunk, valid8)


def _device_lists(idx, tok_doc_start, tok_doc_end, sel_block: int, seg: int, chunk: int, nchunks: int,
                  per: int, rows: int, nruns: int, rows_sorted: bool, skip_forced: bool):
    """The device part of ``inverted_selection``: (items, queries, slots, valid8). ``per``:
    item rows of every chunk but the last; ``rows``: all item rows; ``nruns``: a bound on the
    lists (+1 for the sentinel). Plain torch ops on the device, no host sync."""
    T, H, n = idx.shape
    dev = idx.device
    # a block listed twice counts once, and one past its document's end not at all; sorting a
    # row puts equal blocks side by side and keeps its slots distinct, which is all the
    # per-slot results need
    if not rows_sorted:
        idx = torch.sort(idx, dim=-1).values
    valid = idx >= 0
    valid[..., 1:] &= idx[..., 1:] != idx[..., :-1]
    t = torch.arange(T, device=dev, dtype=torch.int64)[:, None, None]
    h = torch.arange(H, device=dev, dtype=torch.int64)[None, :, None]
    start = tok_doc_start[:, None, None] + idx.to(torch.int64) * sel_block
    valid &= start < tok_doc_end[:, None, None]
    if skip_forced:
        cb = ((t - tok_doc_start[:, None, None]) // sel_block).to(idx.dtype)
        valid &= (idx != 0) & (idx < cb - 1)
    valid8 = valid.to(torch.uint8).contiguous()
    N = T * H * n
    # unlisted slots get the largest key, so they sort last (no masked selection: that syncs)
    big = nchunks * H * T
    key = torch.where(valid, ((t // chunk) * H + h) * T + start, big).reshape(-1)
    if big < 2 ** 31:  # half the radix passes
        key = key.to(torch.int32)
    key, order = torch.sort(key, stable=True)  # flattening is position-major: stable keeps t ascending
    new = torch.ones(N, dtype=torch.bool, device=dev)
    new[1:] = key[1:] != key[:-1]
    # lists (runs of one key): list r starts where the running count of starts reaches r + 1;
    # past the last run the search gives N (then an empty list with the sentinel key)
    rs = torch.searchsorted(torch.cumsum(new, 0), torch.arange(1, nruns + 2, device=dev))
    cnt = rs[1:] - rs[:-1]
    rs = rs[:-1]
    rkey = torch.where(rs < N, key[rs.clamp(max=N - 1)].to(torch.int64), big)  # ascending
    nseg = torch.where(rkey < big, (cnt + seg - 1) // seg, 0)  # the sentinel run lists nothing
    seg_end = torch.cumsum(nseg, 0)
    # the items of chunk c: the segments of its lists, in padded rows per * c ..
    run0 = torch.searchsorted(rkey, torch.arange(nchunks + 1, device=dev) * (H * T))
    first = torch.cat([seg_end.new_zeros(1), seg_end])[run0]  # segments before chunk c
    row = torch.arange(rows, device=dev)
    c = torch.clamp(row // per, max=nchunks - 1)
    g = first[c] + row - c * per  # the row's segment, if its chunk has that many
    used = g < first[c + 1]
    run = torch.searchsorted(seg_end, g, right=True).clamp(max=nruns - 1)
    k = (g - (seg_end - nseg)[run]) * seg  # the segment's first query in its list
    u = rkey[run]
    kstart = u % T
    kend = torch.minimum(kstart + sel_block, tok_doc_end[kstart])
    items = torch.stack([(u // T) % H, kstart, kend, rs[run] + k, torch.clamp(cnt[run] - k, max=seg)], dim=1)
    items = torch.where(used[:, None], items, 0).contiguous()
    return items, order // (H * n), (order % n).to(torch.int32), valid8


@functools.cache
def _compiled_device_lists():
    """``_device_lists`` through torch.compile (one graph). One packing repeats in every layer
    and step and compiles once with static shapes; packed batches whose document count changes
    the bounds recompile once more with those sizes symbolic (torch's automatic dynamic
    shapes), then reuse that graph, rather than compiling per packing."""
    return torch.compile(_device_lists, fullgraph=True)

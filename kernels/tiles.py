"""Bookkeeping of the NSA kernels in plain torch ops: tile tables, selection unions, the inverted selection.

Every kernel works on the packed layout (batch 1, documents concatenated; a plain batch of B
sequences is B documents). A *tile table* is an int64 tensor [num_tiles, 8] with columns
(a0, a1, doc_start, doc_end, c_start, q_lo, q_hi, q_off): the tile covers indices a0..a1-1
(tokens, or compressed tokens for the compressed keys' table) of one document whose tokens are
doc_start..doc_end-1 and whose compressed tokens start at c_start; the document's queries are its
positions q_lo..q_hi-1, position t in query row t - q_off. Tiles never cross a document boundary,
so a kernel program sees one document and needs no per-row document lookups.

Positions are the keys' (the packed K/V rows). The queries may be a part of them (context
parallelism: ``make_layout(q_start=...)``), each document's a contiguous run of positions
whose query rows follow one another; without that, every position is a query, in its own row
(q_lo, q_hi = doc_start, doc_end and q_off = 0).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from nsa_dist.ops.blocks import to_device

COLS = 8  # the kernels' TILE_COLS (range_attn.py)


def tile_table(starts: torch.Tensor, ends: torch.Tensor, doc_start: torch.Tensor,
               doc_end: torch.Tensor, c_start: torch.Tensor, size: int,
               queries: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Split each range [starts[i], ends[i]) into tiles of ``size``: LongTensor [num_tiles, 8].
    queries: [N, 3] (q_lo, q_hi, q_off) of each range's document; default its every position,
    in its own row."""
    if queries is None:
        queries = torch.stack([doc_start, doc_end, torch.zeros_like(doc_start)], dim=1)
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
    return torch.cat([torch.stack([a0, a1, doc_start[doc], doc_end[doc], c_start[doc]], dim=1), queries[doc]],
                     dim=1).contiguous()


@dataclass
class Layout:
    """Document geometry of one packed call.

    cu: [N+1] token offsets and ccu: [N+1] compressed-token offsets, int64 on the CPU (tile
    tables are built from them on the host, with no GPU sync); tok_doc_start / tok_doc_end:
    [T] int64 on the inputs' device, the start / end of each token's document.
    queries: None when every position is a query, in its own row; else [N, 3] int64 on the CPU,
    each document's (q_lo, q_hi, q_off) (``make_layout``'s q_start), with per query row on the
    device: row_pos (its position), row_doc_start / row_doc_end (its document's), and per
    position tok_q_off (its document's q_off).
    """
    cu: torch.Tensor
    ccu: torch.Tensor
    tok_doc_start: torch.Tensor
    tok_doc_end: torch.Tensor
    queries: Optional[torch.Tensor] = None
    row_pos: Optional[torch.Tensor] = None
    row_doc_start: Optional[torch.Tensor] = None
    row_doc_end: Optional[torch.Tensor] = None
    tok_q_off: Optional[torch.Tensor] = None

    @property
    def total(self) -> int:
        return int(self.tok_doc_start.numel())

    @property
    def rows(self) -> int:
        """Query rows (``total`` without an offset)."""
        return self.total if self.queries is None else int(self.row_pos.numel())

    @property
    def device(self) -> torch.device:
        return self.tok_doc_start.device

    def query_tiles(self, size: int) -> torch.Tensor:
        """Tiles of ``size`` query positions within documents (on the layout's device)."""
        s, e = self.cu[:-1], self.cu[1:]
        lo, hi = (s, e) if self.queries is None else (self.queries[:, 0], self.queries[:, 1])
        return to_device(tile_table(lo, hi, s, e, self.ccu[:-1], size, self.queries), self.device)

    def key_tiles(self, size: int) -> torch.Tensor:
        """Tiles of ``size`` key positions within documents: all of them, queries or not (the
        same table as ``query_tiles`` without an offset)."""
        s, e = self.cu[:-1], self.cu[1:]
        return to_device(tile_table(s, e, s, e, self.ccu[:-1], size, self.queries), self.device)

    def first_block_tiles(self, size: int, sel_block: int) -> torch.Tensor:
        """Tiles of ``size`` positions covering each document's selection block 0."""
        s, e = self.cu[:-1], self.cu[1:]
        return to_device(tile_table(s, torch.minimum(s + sel_block, e), s, e, self.ccu[:-1], size, self.queries),
                         self.device)

    def cmp_key_tiles(self, size: int) -> torch.Tensor:
        """Tiles of ``size`` compressed tokens within documents (a0/a1 index compressed tokens)."""
        s, e = self.cu[:-1], self.cu[1:]
        return to_device(tile_table(self.ccu[:-1], self.ccu[1:], s, e, self.ccu[:-1], size, self.queries),
                         self.device)


def make_layout(cu_seqlens, ccu, device=None, q_start: int = 0, num_queries: Optional[int] = None,
                seq_len: Optional[int] = None) -> Layout:
    """Layout from token offsets ``cu_seqlens`` and compressed offsets ``ccu`` ([N+1] each:
    tensors or int lists), built on the host and moved to ``device`` (default: the CPU).

    q_start, num_queries, seq_len: the queries are positions [q_start, q_start + num_queries)
    of each sequence of ``seq_len`` positions (a batch of B sequences packed: seq_len = S;
    default the whole packing, one sequence), in rows one after the other (context
    parallelism's query chunk). Default: every position is a query, in its own row.
    """
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int64).cpu()
    ccu = torch.as_tensor(ccu, dtype=torch.int64).cpu()
    lens = cu[1:] - cu[:-1]
    dev = device or "cpu"
    tok_start = to_device(torch.repeat_interleave(cu[:-1], lens), dev)
    tok_end = to_device(torch.repeat_interleave(cu[1:], lens), dev)
    seq = int(cu[-1]) if seq_len is None else int(seq_len)
    nq = seq - q_start if num_queries is None else int(num_queries)
    if q_start == 0 and nq == seq:
        return Layout(cu, ccu, tok_start, tok_end)
    s, e = cu[:-1], cu[1:]
    base = s // max(seq, 1) * seq  # the document's sequence's first position
    lo = torch.minimum(torch.maximum(s, base + q_start), base + q_start + nq)  # empty: at the queries' edge
    hi = torch.maximum(lo, torch.minimum(e, base + q_start + nq))
    off = q_start + s // max(seq, 1) * (seq - nq)
    nrow = hi - lo
    if not torch.equal(lo - off, torch.cumsum(nrow, 0) - nrow):
        raise ValueError(f"queries [{q_start}, {q_start + nq}) of sequences of {seq} positions do not "
                         f"partition the documents {cu.tolist()} into consecutive rows")
    rows = int(nrow.sum())
    row_pos = torch.arange(rows, dtype=torch.int64) + torch.repeat_interleave(off, nrow)
    return Layout(cu, ccu, tok_start, tok_end, torch.stack([lo, hi, off], dim=1), to_device(row_pos, dev),
                  to_device(torch.repeat_interleave(s, nrow), dev), to_device(torch.repeat_interleave(e, nrow), dev),
                  to_device(torch.repeat_interleave(off, lens), dev))


def selection_union(idx: torch.Tensor, tiles: torch.Tensor, span: int, shifted: bool = False):
    """Union of the blocks chosen by the positions of each query tile.

    idx: [T, H, n] local block indices (-1 padded) per query row; tiles: query tile table of
    ``span`` positions (``shifted``: rows are positions - q_off, the layout has ``queries``).
    Returns (union int32 [num_tiles, H, span*n] ascending then -1, count int32 [num_tiles, H]).
    With span 1 the union is the position's own list (tiles are the rows in order).
    """
    T, H, n = idx.shape
    if span == 1:
        return idx.to(torch.int32).contiguous(), (idx >= 0).sum(-1).to(torch.int32).contiguous()
    nt = tiles.shape[0]
    pos = tiles[:, 0:1] + torch.arange(span, device=idx.device)[None, :]
    inside = pos < tiles[:, 1:2]
    row = pos - tiles[:, 7:8] if shifted else pos
    u = idx[row.clamp(min=0, max=max(T - 1, 0))]  # [nt, span, H, n]
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

    items: int64 [num_items, 6] = (head, key_start, key_end, list_offset, list_len, q_off):
    the block's keys are positions key_start..key_end-1, its document's query rows are
    positions - q_off (``Layout.queries``; 0 without an offset);
    queries: int64 [T * H * n] query rows and slots: int32 [T * H * n] where each choice
    sits in its position's sorted list, grouped by (chunk, head, block), ascending positions
    (the unlisted ones last, never referenced); bounds: the items of position chunk c are
    items[bounds[c]:bounds[c + 1]] (a host list of upper bounds: the rows past a chunk's last
    item are padding, all 0, an empty key range with no queries); chunk: positions
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

    idx: [T, H, n] local block indices (-1 padded) of the layout's query rows (T =
    ``layout.rows``; chunks count rows). Each (chunk, KV head, block) list of
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
    keys = layout.total  # the blocks are the keys' (all of them, with a query offset)
    sizes = [min(chunk, T - c * chunk) for c in range(nchunks)]  # positions per chunk
    bounds = [0]
    for p in sizes:
        bounds.append(bounds[-1] + item_bound(p, H, n, sel_block, seg, keys, ndocs))
    if T * H * n == 0:
        valid8 = torch.zeros(T, H, n, dtype=torch.uint8, device=dev)
        return SelWork(torch.zeros(bounds[-1], 6, dtype=torch.int64, device=dev),
                       torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, dtype=torch.int32, device=dev),
                       bounds, chunk, valid8)
    nruns = sum(list_bound(p, H, n, sel_block, keys, ndocs) for p in sizes) + 1
    build = _compiled_device_lists() if compiled else _device_lists
    lay = layout
    rows = (lay.tok_doc_start, lay.tok_doc_end, None, None) if lay.queries is None else (
        lay.row_doc_start, lay.row_doc_end, lay.row_pos, lay.tok_q_off)
    items, queries, slots, valid8 = build(idx, lay.tok_doc_end, *rows, sel_block, seg, chunk,
                                          nchunks, bounds[1], bounds[-1], nruns, rows_sorted, skip_forced)
    return SelWork(items, queries, slots, bounds, chunk, valid8)


def _device_lists(idx, tok_doc_end, row_doc_start, row_doc_end, row_pos, tok_q_off, sel_block: int, seg: int,
                  chunk: int, nchunks: int, per: int, rows: int, nruns: int, rows_sorted: bool, skip_forced: bool):
    """The device part of ``inverted_selection``: (items, queries, slots, valid8). ``per``:
    item rows of every chunk but the last; ``rows``: all item rows; ``nruns``: a bound on the
    lists (+1 for the sentinel). row_doc_start / row_doc_end: each query row's document,
    row_pos its position (None: the row itself), tok_q_off each key's document's q_off (None:
    0). Plain torch ops on the device, no host sync."""
    T, H, n = idx.shape
    TK = tok_doc_end.shape[0]  # keys: block starts are their positions
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
    start = row_doc_start[:, None, None] + idx.to(torch.int64) * sel_block
    valid &= start < row_doc_end[:, None, None]
    if skip_forced:
        pos = t if row_pos is None else row_pos[:, None, None]
        cb = ((pos - row_doc_start[:, None, None]) // sel_block).to(idx.dtype)
        valid &= (idx != 0) & (idx < cb - 1)
    valid8 = valid.to(torch.uint8).contiguous()
    N = T * H * n
    # unlisted slots get the largest key, so they sort last (no masked selection: that syncs)
    big = nchunks * H * TK
    key = torch.where(valid, ((t // chunk) * H + h) * TK + start, big).reshape(-1)
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
    run0 = torch.searchsorted(rkey, torch.arange(nchunks + 1, device=dev) * (H * TK))
    first = torch.cat([seg_end.new_zeros(1), seg_end])[run0]  # segments before chunk c
    row = torch.arange(rows, device=dev)
    c = torch.clamp(row // per, max=nchunks - 1)
    g = first[c] + row - c * per  # the row's segment, if its chunk has that many
    used = g < first[c + 1]
    run = torch.searchsorted(seg_end, g, right=True).clamp(max=nruns - 1)
    k = (g - (seg_end - nseg)[run]) * seg  # the segment's first query in its list
    u = rkey[run]
    kstart = u % TK
    kend = torch.minimum(kstart + sel_block, tok_doc_end[kstart])
    q_off = torch.zeros_like(kstart) if tok_q_off is None else tok_q_off[kstart]
    items = torch.stack([(u // TK) % H, kstart, kend, rs[run] + k, torch.clamp(cnt[run] - k, max=seg), q_off], dim=1)
    items = torch.where(used[:, None], items, 0).contiguous()
    return items, order // (H * n), (order % n).to(torch.int32), valid8


@functools.cache
def _compiled_device_lists():
    """``_device_lists`` through torch.compile (one graph). One packing repeats in every layer
    and step and compiles once with static shapes; packed batches whose document count changes
    the bounds recompile once more with those sizes symbolic (torch's automatic dynamic
    shapes), then reuse that graph, rather than compiling per packing."""
    return torch.compile(_device_lists, fullgraph=True)

"""NSA forward and backward from the Triton kernels: launch geometry, gates, autograd.

Inputs are brought to the packed layout (batch 1, documents concatenated; a batch of B
sequences is B documents of S tokens), the three branches run with their own kernels, and the
gates combine them. Backward: dg_b = <do, o_b>, the branch's do is g_b * do, and its softmax
correction term is delta_b = g_b * dg_b. dq: one kernel stores the compressed and window
branches' part into an fp32 buffer, the selected branch adds its own and writes q's dtype.
When the selection is the selection kernel's (``Geometry.forced_split``), the selected
branch's forced blocks (0 and the two local ones) run in the range kernels with full tiles,
and the sparse kernels take only the chosen rest.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import triton

from . import tiles as tl_tiles
from . import tma
from .gates import combine, combine_backward, gate_stat_buffers
from .headdim import split_dim
from .launch import SPLIT_BYTES, LaunchConfig, current_launch
from .streams import Overlap
from .range_attn import _FIRST, _LOCAL, LOG2E, _range_bwd_dkdv, _range_bwd_dq, _range_fwd
from .selected_attn import (_sel_bwd_dkdv, _sel_bwd_dq, _sel_bwd_dq_split, _sel_combine, _sel_dq_combine,
                            _sel_fwd, _sel_fwd_split)
from .selection import select_from_lse

class Tiles(NamedTuple):
    """One kernel's tiles and launch keywords in a call (``Geometry.tiles``)."""
    bt: int  # positions per program (position-major kernels; else 1)
    block_m: int  # BLOCK_M: query rows
    block_n: int  # BLOCK_N: keys
    launch: dict  # num_warps, num_stages


POSITION_MAJOR = ("range_fwd", "range_cmp_fwd", "range_dq", "sel_fwd", "sel_dq")  # BT positions x G heads a program


@dataclass
class Geometry:
    """Per-call launch geometry: group size, tile sizes and tile tables."""
    layout: tl_tiles.Layout
    HQ: int
    H: int
    DK: int
    DV: int
    cache: dict = field(default_factory=dict)  # tile tables of this packing, built once
    launch: LaunchConfig = field(default_factory=current_launch)  # tile sizes, choices, warps
    # the selection came from the selection kernel: each row's blocks distinct, ascending, -1
    # last, so the inverted selection needs no per-row sort
    idx_sorted: bool = False
    dtype: torch.dtype = torch.float32  # the inputs' (bytes of the shared-memory tiles)
    sel_block: int = 64  # l': keys per tile of the selected kernels
    prec: str = "ieee"  # tl.dot input precision (``dot_precision``)
    fits: dict = field(default_factory=dict, repr=False)  # Tiles per kernel of this call
    forked: bool = False  # a second stream is running this call's kernels (``Overlap``)

    def tiles(self, kernel: str, dkdv_only: bool = False) -> Tiles:
        """``kernel``'s tiles: the launch config's, shrunk where their shared-memory estimate
        exceeds ``launch.smem_bytes`` at this call's head dims and dtype (``LaunchConfig.fit``).
        dkdv_only: a block-major kernel walking a list only the selected dK/dV walks."""
        if (kernel, dkdv_only) not in self.fits:
            self.fits[(kernel, dkdv_only)] = self._fit(kernel, dkdv_only)
        return self.fits[(kernel, dkdv_only)]

    def _fit(self, kernel: str, dkdv_only: bool) -> Tiles:
        L, G, bt = self.launch, self.G, 1
        if kernel in POSITION_MAJOR:
            part = kernel.split("_")[-1]
            rows = (getattr(L, f"range_{part}_rows") or L.range_rows) if kernel.startswith("range") else L.sel_rows
            n = getattr(L, f"range_{part}_keys") if kernel.startswith("range") else _pow2(self.sel_block)
            if kernel == "range_cmp_fwd":  # the compressed branch's own, where set
                rows, n = L.range_cmp_fwd_rows or rows, L.range_cmp_fwd_keys or n
            bt = max(1, rows // G)
            m = _pow2(bt * G)
        elif kernel == "range_dkdv":
            m, n = L.dkdv_rows, L.dkdv_keys
        else:  # block-major selected kernels: rows of one block's queries, at most a work item
            m = _pow2(min(getattr(L, f"{kernel}_rows"), _sel_seg(self, dkdv_only) * G))
            n = _pow2(self.sel_block)
        stages = L.warps_stages(kernel)[1]
        fm, fn, stages = L.fit(kernel, m, n, self.bdk(), self.bdv(), self.dtype.itemsize, stages,
                               rows_min=_pow2(G) if kernel in POSITION_MAJOR else 16,
                               fixed="keys" if kernel.startswith("sel") else "")
        if fm != m and kernel in POSITION_MAJOR:  # fewer positions a program
            bt = max(1, fm // G)
            fm = _pow2(bt * G)
        warps = L.acc_warps(kernel, fm, fn, self.bdk(), self.bdv())  # more warps for large accumulators
        return Tiles(bt, fm, fn, {"num_warps": warps, "num_stages": stages, **L.reg_cap(kernel)})

    def _table(self, key: tuple, build):
        """A tile table of this packing, built on first use (host-built, copied to the device
        without blocking on the current stream). While two streams run (``forked``) a table
        first made on one could be read by the other before its copy lands: the host then
        waits for the copy. ``NSAFunction.forward`` and ``_backward_tables`` build what the
        forked kernels read beforehand."""
        table = self.cache.get(key)
        if table is None:
            table = self.cache[key] = build()
            if self.forked and table.is_cuda:
                torch.cuda.current_stream(table.device).synchronize()
        return table

    def qtiles(self, size: int) -> torch.Tensor:
        return self._table(("q", size), lambda: self.layout.query_tiles(size))

    def ktiles(self, size: int) -> torch.Tensor:
        """Tiles of ``size`` keys (``qtiles`` itself unless the queries are a chunk of the keys)."""
        if self.layout.queries is None:
            return self.qtiles(size)
        return self._table(("k", size), lambda: self.layout.key_tiles(size))

    def first_tiles(self, size: int, sel_block: int) -> torch.Tensor:
        """Tiles of ``size`` positions over each document's selection block 0 (of ``sel_block``)."""
        return self._table(("b0", size, sel_block), lambda: self.layout.first_block_tiles(size, sel_block))

    def dkdv_keys(self) -> int:
        """Keys per program of the range dK/dV kernel."""
        return self.tiles("range_dkdv").block_n

    def dkdv_chunks(self, ntiles: int) -> tuple[int, int]:
        """(positions per query chunk, chunks) of the compressed keys' dK/dV over ``ntiles`` key
        tiles (of all documents), whose keys every later query sees (block 0 of the selection
        has its own: ``first_chunks``): ``launch.dkdv_qchunk`` positions, or with
        ``launch.dkdv_programs`` fewer where that would leave fewer programs with queries to
        stream, at least ``launch.first_min_chunk``. Host arithmetic on the offsets."""
        qchunk, want = self.launch.dkdv_qchunk, self.launch.dkdv_programs
        if want and self.layout.total:
            # a tile's keys are seen by about half its document's queries (tiles per document
            # in proportion to its length)
            lens = (self.layout.cu[1:] - self.layout.cu[:-1]).double()
            per_tile = int((lens ** 2).sum() / lens.sum()) // 2
            work = ntiles * self.H * max(1, per_tile)  # (tile, KV head, query position) triples
            qchunk = min(qchunk, max(self.launch.first_min_chunk, -(-work // want)))
        return qchunk, -(-self.layout.total // qchunk)

    def first_chunks(self, ntiles: int) -> tuple[int, int]:
        """(positions per query chunk, chunks) of block 0's dK/dV over ``ntiles`` key tiles
        (of all documents): chunks of document-local positions sized so that about
        ``launch.first_programs`` programs have queries to stream, at least
        ``launch.first_min_chunk`` positions each (each chunk adds its sums atomically); the
        grid covers the longest document. Host arithmetic on the offsets: no GPU sync."""
        want = self.launch.first_programs
        lens = self.layout.cu[1:] - self.layout.cu[:-1]
        if lens.numel() == 0 or self.layout.total == 0:
            return 1, 1
        # a document of length L makes ~L / qchunk working chunks per tile and KV head
        work = self.layout.rows * max(1, ntiles) * self.H  # queries x tiles per document x heads
        qchunk = max(self.launch.first_min_chunk, -(-work // (lens.numel() * max(1, want))))
        return qchunk, -(-int(lens.max()) // qchunk)

    def ctiles(self, size: int) -> torch.Tensor:
        return self._table(("c", size), lambda: self.layout.cmp_key_tiles(size))

    @property
    def G(self) -> int:
        return self.HQ // self.H

    def sel_block_major(self) -> bool:
        """Selected forward block-major (small groups) or position-major (G >= 16)?

        Position-major loads a block's keys once per position tile: with few heads per tile
        the K/V traffic per FLOP is high. Block-major loads them once per segment of the
        positions that chose the block, at the price of gathering queries and writing n
        per-slot results that a second kernel merges. ``launch.sel_algo`` ("block" / "query")
        overrides the choice by ``launch.sel_query_min_g``.
        """
        algo = self.launch.sel_algo
        return self.G < self.launch.sel_query_min_g if algo == "auto" else algo == "block"

    def forced_split(self) -> bool:
        """Run the selected branch's forced blocks (0 and the two local ones) in the range
        kernels, full tiles of positions that share them, and only the chosen blocks in the
        sparse kernels? Needs the selection kernel's rows (``idx_sorted``: forced blocks
        always present). ``launch.sel_forced = False`` turns it off (tuning sweeps)."""
        return self.idx_sorted and self.launch.sel_forced

    def window_forced(self) -> bool:
        """The window and the forced blocks in one range-forward launch? ``launch.window_forced``,
        or by the group size where it is None (from G = 16: measured faster there only)."""
        on = self.launch.window_forced
        return self.G >= 16 if on is None else on

    def sel_dq_block_major(self) -> bool:
        """Selected dq block-major (per-slot dq of each block's queries, then a sum; no K/V
        re-read per position) or position-major? ``launch.sel_dq_algo`` overrides the choice by
        ``launch.sel_dq_query_min_g``."""
        algo = self.launch.sel_dq_algo
        return self.G < self.launch.sel_dq_query_min_g if algo == "auto" else algo in ("block", "fused")

    def sel_dq_fused(self) -> bool:
        """Block-major selected dq written by the selected dK/dV kernel itself: q and dO gathered
        once for both, one more product per step there. ``launch.sel_dq_algo`` "fused", or "auto"
        with a block-major dq and Dk >= ``launch.sel_dq_fused_min_dk`` (wide rows: the second
        gather costs more than the fused kernel's extra product)."""
        algo = self.launch.sel_dq_algo
        if algo == "auto":
            return self.sel_dq_block_major() and self.DK >= self.launch.sel_dq_fused_min_dk
        return algo == "fused"

    def dq_partial_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Per-slot dq of the block-major dq: fp16 with a power-of-two scale per (row, slot)
        ("fp16s") or fp32. "auto" (``launch.sel_dq_partial``, default): fp16s for 16-bit
        inputs, whose own rounding is at least as coarse (fp16: the same 11 bits, bf16: 8),
        fp32 for fp32 inputs."""
        name = self.launch.sel_dq_partial
        if name == "auto":
            name = "fp16s" if dtype in (torch.bfloat16, torch.float16) else "fp32"
        return torch.float16 if name == "fp16s" else torch.float32

    def split_chunk(self, n: int, dtype: torch.dtype) -> int:
        """Positions per chunk of the block-major kernels, so that their per-slot buffers
        (forward: o and lse; dq: dq) stay within ``split_bytes()``."""
        per_pos = self.HQ * n * (self.DV * dtype.itemsize + 4)
        if self.sel_dq_block_major():
            pdt = self.dq_partial_dtype(dtype)
            per_pos = max(per_pos, self.HQ * n * (self.DK * pdt.itemsize + (4 if pdt == torch.float16 else 0)))
        return max(1, self.split_bytes() // per_pos)

    def split_bytes(self) -> int:
        """Bound of each block-major per-slot buffer: ``launch.split_bytes``, else
        ``launch.SPLIT_BYTES`` (2 GiB)."""
        return SPLIT_BYTES if self.launch.split_bytes is None else self.launch.split_bytes

    def dk_split(self) -> tuple[int, int, int]:
        """Widths of the kernels' Dk pieces, 0 for none (``headdim.split_dim`` by
        ``launch.head_dim_pieces``)."""
        return split_dim(self.DK, self.launch.head_dim_pieces)

    def bdk(self) -> int:
        """Columns of the kernels' Dk tiles: all pieces."""
        return sum(self.dk_split())

    def dk_pieces(self) -> dict:
        """The kernels' Dk piece constants: BDK (the first piece), BDK2 and BDK3 (the later ones, or 0)."""
        return dict(zip(("BDK", "BDK2", "BDK3"), self.dk_split()))

    def bdv(self) -> int:
        return max(16, triton.next_power_of_2(self.DV))


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _range_forward(mode, q, k, v, geo: Geometry, cfg, scale2, lse_only=False, out=None, forced=None):
    """(o [T, HQ, Dv] or None with ``lse_only``, lse [T, HQ] base 2) of one key range kind,
    into ``out`` = (o, lse) when given. Mode 3 (the window of k / v, then the forced blocks in
    the same launch): ``forced`` = (k_sel, v_sel, o_sel, lse_sel), the buffers the forced
    blocks' result goes to."""
    T = q.shape[0]
    if out is not None:
        o, lse = out
    else:
        o = torch.empty(T, geo.HQ, geo.DV, dtype=q.dtype, device=q.device) if not lse_only else q
        lse = torch.empty(T, geo.HQ, dtype=torch.float32, device=q.device)
    t = geo.tiles("range_cmp_fwd" if mode == 0 else "range_fwd")
    qt = geo.qtiles(t.bt)
    if qt.shape[0]:
        def desc(k_, v_):
            return tma.kv_descriptors(k_, v_, geo, t.block_n) if geo.launch.range_tma else (None, None)

        kd, vd = desc(k, None if lse_only else v)
        k2, v2, o2, lse2 = forced if mode == 3 else (k, v, o, lse)
        kd2, vd2 = desc(k2, v2) if mode == 3 else (kd, vd)
        if kd2 is None:  # one launch, one way of loading: both pairs through TMA or neither
            kd = vd = None
        _range_fwd[(qt.shape[0], geo.H)](
            q, k, v, o, lse, qt, kd, vd, k2, v2, o2, lse2, kd2, vd2, scale2, geo.HQ, geo.DK, geo.DV, G=geo.G, MODE=mode,
            L=cfg.cmp_block, DS=cfg.cmp_stride, W=cfg.window, LS=cfg.sel_block, BT=t.bt, BLOCK_M=t.block_m,
            BLOCK_N=t.block_n, BDV=geo.bdv(), LSE_ONLY=lse_only, PREC=geo.prec, TMA=kd is not None,
            **geo.dk_pieces(), **t.launch)
    return (None if lse_only else o), lse


def _range_dq(q, k_cmp, v_cmp, k_win, v_win, k_sel, v_sel, do, lses, delta, geo: Geometry,
              cfg, scale2, scale, stats=None) -> torch.Tensor:
    """dq of the compressed and window branches and of the selected branch's forced blocks
    (``forced_split``), fp32 [T, HQ, Dk], from one kernel that loads q once and writes every
    row (the selected kernels add the rest last). lses, delta: the gate backward's [3, T, HQ]
    (``gates.gate_stat_buffers``: compressed, selected, window). ``stats``
    (``gate_bwd_fused``): (o_cmp, o_sel, o_win or None, gates, the branches' raw log-sum-exps
    (c, s, w or None), dg): the kernel fills dg, lses and delta first, for itself and for the
    kernels after it."""
    dq32 = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    t = geo.tiles("range_dq")
    qt = geo.qtiles(t.bt)
    if qt.shape[0]:
        win = cfg.window > 0
        kw, vw = (k_win, v_win) if win else (k_cmp, v_cmp)
        descs = [None] * 6
        if geo.launch.range_tma:  # every key kind through TMA, or none (one constexpr)
            pairs = [tma.kv_descriptors(a, b, geo, t.block_n) for a, b in ((k_cmp, v_cmp), (kw, vw), (k_sel, v_sel))]
            if all(p[0] is not None for p in pairs):
                descs = [d for p in pairs for d in p]
        if stats is None:  # any tensor stands for the gate backward's pointers
            gs = (dq32,) * 8
        else:
            o_c, o_s, o_w, gates, (raw_c, raw_s, raw_w), dg = stats
            gs = (o_c, o_s, o_c if o_w is None else o_w, gates, raw_c, raw_s, raw_c if raw_w is None else raw_w, dg)
        _range_bwd_dq[(qt.shape[0], geo.H)](
            q, k_cmp, v_cmp, kw, vw, k_sel, v_sel, do, lses, delta, q.shape[0] * geo.HQ,
            dq32, qt, *descs, *gs, scale2, scale, geo.HQ, geo.DK, geo.DV,
            G=geo.G, GATE_STATS=stats is not None, L=cfg.cmp_block,
            DS=cfg.cmp_stride, W=cfg.window, LS=cfg.sel_block, HAS_WIN=win, FORCED=geo.forced_split(),
            BT=t.bt, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BDV=geo.bdv(), PREC=geo.prec, TMA=descs[0] is not None,
            **geo.dk_pieces(), **t.launch)
    return dq32


def _range_dkdv(mode, q, k, v, do, lse, delta, geo: Geometry, cfg, scale2, scale):
    """dK, dV of the compressed (mode 0) or window (mode 1) branch, in k's / v's dtype."""
    # Compressed keys: split each tile's queries into chunks (fp32 atomic sums) so the grid
    # is wide enough for the few KV heads a TP / Ulysses rank holds. Window keys see at most
    # BLOCK_N + w queries: one chunk, plain stores.
    kb = geo.dkdv_keys()
    kt = geo.ctiles(kb) if mode == 0 else geo.ktiles(kb)
    qchunk, nchunk = geo.dkdv_chunks(kt.shape[0]) if mode == 0 else (1 << 62, 1)
    atomic = nchunk > 1
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device) if atomic else torch.empty_like(k)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device) if atomic else torch.empty_like(v)
    if kt.shape[0] == 0 or geo.layout.total == 0:
        return dk.zero_().to(k.dtype), dv.zero_().to(v.dtype)
    _launch_dkdv(mode, kt, nchunk, qchunk, atomic, q, k, v, do, lse, delta, dk, dv, geo, cfg, scale2, scale)
    return dk.to(k.dtype), dv.to(v.dtype)


def _launch_dkdv(mode, kt, nchunk, qchunk, atomic, q, k, v, do, lse, delta, dk, dv, geo, cfg, scale2, scale):
    """One ``_range_bwd_dkdv`` launch over key tiles kt and nchunk chunks of qchunk queries."""
    t = geo.tiles("range_dkdv")
    qd, dod = tma.row_descriptors(q, do, geo, t.block_m) if geo.launch.dkdv_tma else (None, None)
    _range_bwd_dkdv[(kt.shape[0], geo.H, nchunk)](q, k, v, do, lse, delta, dk, dv, kt, qd, dod, scale2, scale,
                                                  geo.HQ, geo.DK, geo.DV, qchunk, G=geo.G, MODE=mode,
                                                  L=cfg.cmp_block, DS=cfg.cmp_stride, W=cfg.window,
                                                  LS=cfg.sel_block, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                                                  BDV=geo.bdv(), ATOMIC=atomic, PREC=geo.prec, TMA=qd is not None,
                                                  **geo.dk_pieces(), **t.launch)


def _forced_dkdv(q, k, v, do, lse, delta, dk32, dv32, geo: Geometry, cfg, scale2, scale):
    """The selected branch's dK/dV over its forced blocks, into fp32 dk32 / dv32, which this
    initialises (every key row is stored once by the local-block pass) and the sparse kernel
    then adds to. Block 0, which every later query sees, runs in chunks of queries."""
    kt = geo.ktiles(geo.dkdv_keys())
    if kt.shape[0] == 0:
        dk32.zero_(), dv32.zero_()
        return
    _launch_dkdv(_LOCAL.value, kt, 1, 1 << 62, False, q, k, v, do, lse, delta, dk32, dv32, geo, cfg, scale2, scale)
    ft = geo.first_tiles(geo.dkdv_keys(), cfg.sel_block)
    if ft.shape[0]:
        qchunk, nchunk = geo.first_chunks(ft.shape[0])
        _launch_dkdv(_FIRST.value, ft, nchunk, qchunk, True, q, k, v, do, lse, delta, dk32, dv32, geo, cfg,
                     scale2, scale)


def _sel_prep(idx, geo: Geometry, bt: int):
    qt = geo.qtiles(bt)
    union, cnt = tl_tiles.selection_union(idx, qt, bt, shifted=geo.layout.queries is not None)
    return qt, union, cnt


def _sel_seg(geo: Geometry, dkdv_only: bool = False) -> int:
    """Positions per work item: ``launch.sel_seg_rows`` rows, or for a list only the selected
    dK/dV walks ``launch.sel_dkdv_seg_rows`` (the dK/dV sums an item in registers and pays its
    atomics once; where the forward or dq walk the list too, more, shorter items win), over G."""
    rows = geo.launch.sel_dkdv_seg_rows if dkdv_only else geo.launch.sel_seg_rows
    return max(1, rows // geo.G)


def _sel_work(idx, geo: Geometry, cfg, chunk=None, dkdv_only=False):
    """The inverted selection (``tiles.SelWork``) the block-major kernels walk. It needs no
    host sync, so the host keeps queueing kernels while the GPU builds it."""
    compiled = geo.launch.compile_tables
    if compiled is None:
        compiled = idx.is_cuda
    return tl_tiles.inverted_selection(idx, geo.layout, cfg.sel_block, _sel_seg(geo, dkdv_only), chunk,
                                       rows_sorted=geo.idx_sorted, skip_forced=geo.forced_split(),
                                       compiled=compiled)


def _sel_block_args(geo: Geometry, cfg, kernel: str, dkdv_only: bool = False) -> dict:
    """Block-major kernel ``kernel``'s constants and launch keywords; its rows per step:
    ``launch.<kernel>_rows`` (sel_split, sel_dq_split, sel_dkdv), at most a segment."""
    t = geo.tiles(kernel, dkdv_only)
    return dict(G=geo.G, LS=cfg.sel_block, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BDV=geo.bdv(),
                PREC=geo.prec, **geo.dk_pieces(), **_l2_hints(geo), **t.launch)


def _l2_hints(geo: Geometry) -> dict:
    """L2 eviction policies of the block-major kernels (``launch.sel_l2_hints``): the gathered q /
    dO rows kept ("evict_last", each is read once per block its position chose), the per-slot
    buffers streamed ("evict_first", written once and read once); "" the hardware's default."""
    on = geo.launch.sel_l2_hints
    return {"EVQ": "evict_last" if on else "", "EVS": "evict_first" if on else ""}


def _gated_args(gated, o) -> tuple:
    """(OC, OW, GATES, OUT, GATED / HAS_WIN constexprs) of the selected kernels' fused gate
    combination: ``gated`` = (o_cmp, o_win or None, gates, out) [T, HQ, ...], or None (then
    any tensor stands for the pointers)."""
    if gated is None:
        return (o, o, o, o), dict(GATED=False, HAS_WIN=False)
    o_c, o_w, gates, out = gated
    return (o_c, o_c if o_w is None else o_w, gates, out), dict(GATED=True, HAS_WIN=o_w is not None)


def _sel_forward(q, k, v, idx, o, lse, geo: Geometry, cfg, scale2, gated=None, forced_done=False):
    """Selected branch into o [T, HQ, Dv] and lse [T, HQ] (base 2); returns the block-major
    work list (the backward walks it too) or None. ``gated`` = (o_cmp, o_win or None, gates
    [T, HQ, 3], out [T, HQ, Dv]): its last kernel also writes the gate combination into out.
    ``forced_done``: the forced blocks' (o, lse) are in (o, lse) already (``window_forced``)."""
    n = idx.shape[-1]
    forced = geo.forced_split()
    # the forced blocks' attention and lse (MODE 2), with full tiles, in the output buffers:
    # the sparse kernels read each row's forced state before they write that row's result
    if forced and not forced_done:
        _range_forward(2, q, k, v, geo, cfg, scale2, out=(o, lse))
    if geo.sel_block_major():
        return _sel_forward_split(q, k, v, idx, o, lse, geo, cfg, scale2, gated)
    t = geo.tiles("sel_fwd")
    qt, union, cnt = _sel_prep(idx, geo, t.bt)
    if qt.shape[0]:
        kd, vd = _sel_descriptors(k, v, geo, cfg, t)
        gp, gk = _gated_args(gated, o)
        _sel_fwd[(qt.shape[0], geo.H)](q, k, v, o, lse, o, lse, qt, idx, union, cnt, kd, vd, *gp, scale2, geo.HQ,
                                       geo.DK, geo.DV, n, union.shape[-1], G=geo.G, LS=cfg.sel_block, BT=t.bt,
                                       BLOCK_M=t.block_m, BLOCK_N=t.block_n, NPAD=_pow2(n), BDV=geo.bdv(),
                                       FORCED=forced, PREC=geo.prec, TMA=kd is not None, **geo.dk_pieces(),
                                       **gk, **t.launch)
    return None


def _sel_descriptors(k, v, geo: Geometry, cfg, t) -> tuple:
    """The position-major selected kernels' K / V descriptors (``launch.sel_tma``): a box is one
    selected block, so only where the tiles' keys are l'; else (None, None), the pointer loads."""
    if geo.launch.sel_tma and t.block_n == cfg.sel_block:
        return tma.kv_descriptors(k, v, geo, t.block_n)
    return None, None


def _slots(shape, dtype, device) -> torch.Tensor:
    """An uninitialised per-slot buffer of the block-major kernels: only the slots the work list
    names are written, and the merges read only those (``SelWork.valid``); tests fill it with
    NaN to check that."""
    return torch.empty(shape, dtype=dtype, device=device)


def _sel_forward_split(q, k, v, idx, o, lse, geo: Geometry, cfg, scale2, gated=None):
    """Block-major: per-slot results of each chunk of positions, then their merge into (o, lse),
    which under ``forced_split`` hold the forced blocks' (o, lse) on entry (the merge reads a
    row's before it writes it); ``gated`` as ``_sel_forward``'s. Returns the work list."""
    T = q.shape[0]
    n = idx.shape[-1]
    work = _sel_work(idx, geo, cfg, geo.split_chunk(n, q.dtype))
    rows = min(work.chunk, T) * geo.HQ
    op = _slots((rows * n, geo.DV), q.dtype, q.device)
    lp = _slots((rows * n,), torch.float32, q.device)
    block_r = geo.launch.sel_combine_rows
    forced = geo.forced_split()
    for c in range(len(work.bounds) - 1):
        t0, t1 = c * work.chunk, min((c + 1) * work.chunk, T)
        i0, i1 = work.bounds[c], work.bounds[c + 1]
        _sel_fwd_split[(i1 - i0,)](q, k, v, op, lp, work.items[i0:i1], work.queries, work.slots, scale2,
                                   geo.HQ, geo.DK, geo.DV, n, t0 * geo.HQ, **_sel_block_args(geo, cfg, "sel_split"))
        nr = (t1 - t0) * geo.HQ
        gp, gk = _gated_args(None if gated is None else [None if x is None else x[t0:t1] for x in gated], o)
        _sel_combine[(triton.cdiv(nr, block_r),)](op, lp, work.valid[t0:t1], o[t0:t1] if forced else op,
                                                  lse[t0:t1] if forced else lp, o[t0:t1], lse[t0:t1], *gp, nr,
                                                  geo.HQ, n, geo.DV, G=geo.G, BLOCK_R=block_r, NPAD=_pow2(n),
                                                  BDV=geo.bdv(), FORCED=forced, EVS=_l2_hints(geo)["EVS"], **gk,
                                                  **geo.launch.warps("sel_combine"))
    return work


def _sel_dq_block(q, k, v, do, lse, delta, dq32, dq, n, work, geo: Geometry, cfg, scale2, scale, dkdv=None):
    """Block-major selected dq: per-slot dq of each chunk of positions, then their sum plus dq32
    into dq (q's dtype). dkdv: (dk32, dv32) with the fused dq (``sel_dq_algo="fused"``): the
    dK/dV kernel writes the slots while it adds into dk32 / dv32 (one pass over q and dO)."""
    T = q.shape[0]
    pdt = geo.dq_partial_dtype(q.dtype)
    scaled = pdt == torch.float16
    rows = min(work.chunk, T) * geo.HQ * n
    dqp = _slots((rows, geo.DK), pdt, q.device)
    dqs = _slots((rows if scaled else 1,), torch.float32, q.device)
    block_r = geo.launch.sel_combine_rows
    for c in range(len(work.bounds) - 1):
        t0, t1 = c * work.chunk, min((c + 1) * work.chunk, T)
        i0, i1 = work.bounds[c], work.bounds[c + 1]  # every chunk has item rows (tiles.item_bound >= 1)
        if dkdv is not None:
            _sel_bwd_dkdv[(i1 - i0,)](q, k, v, do, lse, delta, *dkdv, work.items[i0:i1], work.queries, dqp, dqs,
                                      work.slots, scale2, scale, geo.HQ, geo.DK, geo.DV, n, t0 * geo.HQ,
                                      DQ_SLOTS=True, SCALED=scaled, **_sel_block_args(geo, cfg, "sel_dkdv_dq"))
        else:
            _sel_bwd_dq_split[(i1 - i0,)](q, k, v, do, lse, delta, dqp, dqs, work.items[i0:i1], work.queries,
                                          work.slots, scale2, scale, geo.HQ, geo.DK, geo.DV, n, t0 * geo.HQ,
                                          SCALED=scaled, **_sel_block_args(geo, cfg, "sel_dq_split"))
        nr = (t1 - t0) * geo.HQ
        _sel_dq_combine[(triton.cdiv(nr, block_r),)](dqp, dqs, work.valid[t0:t1], dq32[t0:t1], dq[t0:t1], nr,
                                                     geo.HQ, n, geo.DK, G=geo.G, BLOCK_R=block_r, BDK=_pow2(geo.DK),
                                                     SCALED=scaled, EVS=_l2_hints(geo)["EVS"],
                                                     **geo.launch.warps("sel_dq_combine"))


def _sel_keys_backward(q, k, v, do, lse, delta, idx, geo: Geometry, cfg, scale2, scale, work, dk, dv, dq_out=None):
    """The selected branch's dK/dV into dk / dv (k's / v's dtype); returns the block-major work
    list (the forward's, or built here when it made none: the dq walks it too).
    dq_out: (dq32, dq) with the fused dq (``Geometry.sel_dq_fused``): the same kernel writes the
    per-slot dq, summed with dq32 (the other branches) into dq (q's dtype)."""
    n = idx.shape[-1]
    # fp32 sums (atomic adds), in dk / dv themselves when they are fp32
    dk32 = dk if dk.dtype == torch.float32 else torch.empty(k.shape, dtype=torch.float32, device=k.device)
    dv32 = dv if dv.dtype == torch.float32 else torch.empty(v.shape, dtype=torch.float32, device=v.device)
    if geo.forced_split():  # the forced blocks' part first: it initialises the buffers
        _forced_dkdv(q, k, v, do, lse, delta, dk32, dv32, geo, cfg, scale2, scale)
    else:
        dk32.zero_()
        dv32.zero_()
    block_dq = geo.sel_dq_block_major()
    dkdv_only = work is None and not block_dq  # the list is the selected dK/dV's alone
    if work is None:  # the forward made no work list (position-major); chunks bound the dq's buffer
        work = _sel_work(idx, geo, cfg, geo.split_chunk(n, q.dtype) if block_dq else None, dkdv_only)
    # the forward's work list when it made one (its chunks only split segments further)
    if dq_out is not None:
        _sel_dq_block(q, k, v, do, lse, delta, *dq_out, n, work, geo, cfg, scale2, scale, dkdv=(dk32, dv32))
    elif work.items.shape[0]:
        z = work.items  # no dq slots: any tensor stands for their pointers
        _sel_bwd_dkdv[(work.items.shape[0],)](q, k, v, do, lse, delta, dk32, dv32, work.items, work.queries,
                                              z, z, z, scale2, scale, geo.HQ, geo.DK, geo.DV, n, 0, DQ_SLOTS=False,
                                              SCALED=False, **_sel_block_args(geo, cfg, "sel_dkdv", dkdv_only))
    if dk32 is not dk:
        dk.copy_(dk32)
    if dv32 is not dv:
        dv.copy_(dv32)
    return work


def _sel_dq_backward(q, k, v, do, lse, delta, idx, geo: Geometry, cfg, scale2, scale, dq32, work, dq):
    """dq = dq32 (the other branches, fp32) + the selected branch's, into dq (q's dtype)."""
    n = idx.shape[-1]
    if geo.sel_dq_block_major():
        _sel_dq_block(q, k, v, do, lse, delta, dq32, dq, n, work, geo, cfg, scale2, scale)
        return
    t = geo.tiles("sel_dq")
    qt, union, cnt = _sel_prep(idx, geo, t.bt)
    if qt.shape[0]:
        kd, vd = _sel_descriptors(k, v, geo, cfg, t)
        _sel_bwd_dq[(qt.shape[0], geo.H)](q, k, v, do, lse, delta, dq32, dq, qt, idx, union, cnt, kd, vd,
                                          scale2, scale, geo.HQ, geo.DK, geo.DV, n, union.shape[-1], G=geo.G,
                                          LS=cfg.sel_block, BT=t.bt, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                                          NPAD=_pow2(n), BDV=geo.bdv(), FORCED=geo.forced_split(), PREC=geo.prec,
                                          TMA=kd is not None, **geo.dk_pieces(), **t.launch)


def _range_keys_backward(q, k_cmp, v_cmp, k_win, v_win, do, lse_c, lse_w, delta, geo: Geometry, cfg, scale2,
                         scale):
    """(dk_cmp, dv_cmp, dk_win, dv_win) of the compressed and window branches."""
    dkc, dvc = _range_dkdv(0, q, k_cmp, v_cmp, do, lse_c, delta[0], geo, cfg, scale2, scale)
    if cfg.window > 0:
        dkw, dvw = _range_dkdv(1, q, k_win, v_win, do, lse_w, delta[2], geo, cfg, scale2, scale)
    else:
        dkw, dvw = torch.zeros_like(k_win), torch.zeros_like(v_win)
    return dkc, dvc, dkw, dvw


def _backward_tables(geo: Geometry, cfg) -> None:
    """Build every tile table the backward's kernels read before its streams fork (each
    stream then only reads them; ``Geometry._table``)."""
    geo.qtiles(geo.tiles("range_dq").bt)
    kb = geo.dkdv_keys()
    geo.ctiles(kb)
    geo.ktiles(kb)
    if geo.forced_split():
        geo.first_tiles(kb, cfg.sel_block)
    if not geo.sel_dq_block_major():
        geo.qtiles(geo.tiles("sel_dq").bt)


class NSAFunction(torch.autograd.Function):
    """Packed NSA: tensors [T, heads, D]; idx [T, H, n] int32 local block indices.

    memo: None, or a dict shared by a forward and its recomputation (activation checkpointing).
    The first call stores the branches' outputs and log-sum-exps (and the selected branch's
    work list) in it; a call that finds them there runs only the gate combination, and its
    backward uses them with the recomputed inputs. The inputs must be the same values."""

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, idx, geo, cfg, scale, pre=None,
                memo=None):
        scale2 = scale * LOG2E
        o = None
        if memo is not None and "branches" in memo:
            o_c, lse_c, o_s, lse_s, o_w, lse_w, work = memo["branches"]
        else:
            # pre: (o_cmp, lse_cmp) already computed for the selection, or None
            o_c, lse_c = pre if pre is not None else _range_forward(0, q, k_cmp, v_cmp, geo, cfg, scale2)
            # with ``overlap_branches`` on CUDA the selected branch (work list, per-slot split and
            # merge: memory- and latency-bound) runs on a side stream beside the window
            # (compute-bound), queued first; else the same launches on one stream. Its outputs
            # and the tile tables are made before the fork.
            ov = Overlap(geo, q.device, enabled=cfg.window > 0)
            o_s = torch.empty(q.shape[0], geo.HQ, geo.DV, dtype=q.dtype, device=q.device)
            lse_s = torch.empty(q.shape[0], geo.HQ, dtype=torch.float32, device=q.device)
            geo.qtiles(geo.tiles("range_fwd").bt)
            if not geo.sel_block_major():
                geo.qtiles(geo.tiles("sel_fwd").bt)
            # ``gate_fused`` (one stream): the selected branch's last kernel writes the layer's output
            out = torch.empty_like(o_s) if geo.launch.gate_fused and not ov.active else None
            # ``window_forced`` (one stream): the window's launch runs the forced blocks too
            both = geo.window_forced() and not ov.active and cfg.window > 0 and geo.forced_split()
            ov.fork()
            try:
                if both:
                    o_w, lse_w = _range_forward(3, q, k_win, v_win, geo, cfg, scale2, forced=(k_sel, v_sel, o_s, lse_s))
                else:
                    o_w, lse_w = _range_forward(1, q, k_win, v_win, geo, cfg, scale2) if cfg.window > 0 else (None, None)
                with ov.on_side():
                    work = _sel_forward(q, k_sel, v_sel, idx, o_s, lse_s, geo, cfg, scale2, forced_done=both,
                                        gated=None if out is None else (o_c, o_w, gates, out))
                if work is not None:  # kept for the backward (and a recomputation's memo)
                    ov.hand_over(work.items, work.queries, work.slots, work.valid)
            finally:
                ov.join()
            if memo is not None:
                memo["branches"] = (o_c, lse_c, o_s, lse_s, o_w, lse_w, work)
            o = out
        if o is None:
            o = combine(o_c, o_s, o_w, gates, geo.launch.gate_rows)
        ctx.save_for_backward(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, idx,
                              o_c, lse_c, o_s, lse_s, o_w, lse_w)
        ctx.geo, ctx.cfg, ctx.scale, ctx.sel_work = geo, cfg, scale, work
        return o

    @staticmethod
    def backward(ctx, do):
        (q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, idx,
         o_c, lse_c, o_s, lse_s, o_w, lse_w) = ctx.saved_tensors
        geo, cfg, scale = ctx.geo, ctx.cfg, ctx.scale
        scale2 = scale * LOG2E
        # every branch's backward reads do itself, its gate folded into (lse, delta): no g*do copies
        do = do.contiguous()
        ov = Overlap(geo, q.device)
        raw = (lse_c, lse_s, lse_w)
        # ``gate_bwd_fused`` (one stream): the range dq, the first kernel, computes the gate backward
        stats = geo.launch.gate_bwd_fused and not ov.active
        if stats:
            dg, lses, delta = gate_stat_buffers(q.shape[0], geo.HQ, o_w is not None, q.device)
        else:
            dg, lses, delta = combine_backward(do, o_c, o_s, o_w, gates, raw, geo.launch.gate_rows)
        lse_c, lse_s, lse_w = lses[0], lses[1], lses[2] if o_w is not None else None
        sel = (q, k_sel, v_sel, do, lse_s, delta[1], idx, geo, cfg, scale2, scale)
        # the range kernels on the main stream; the selected branch's dK/dV, then its dq, on the
        # side stream with ``overlap_branches`` on CUDA, else after them on one stream. dq: the
        # range dq stores the compressed and window branches' part (fp32), the selected dq adds
        # its own and writes q's dtype (so it waits for the range dq). The outputs the side
        # stream writes and the tile tables are made before the fork.
        dq, dks, dvs = torch.empty_like(q), torch.empty_like(k_sel), torch.empty_like(v_sel)
        _backward_tables(geo, cfg)
        ov.fork()
        try:
            dq32 = _range_dq(q, k_cmp, v_cmp, k_win, v_win, k_sel, v_sel, do, lses, delta, geo,
                             cfg, scale2, scale, stats=(o_c, o_s, o_w, gates, raw, dg) if stats else None)
            dq32_done = ov.mark()
            if geo.sel_dq_fused():  # one kernel for the selected dK/dV and dq: it waits for dq32
                with ov.on_side(after=dq32_done):
                    _sel_keys_backward(*sel, ctx.sel_work, dks, dvs, dq_out=(dq32, dq))
            else:
                with ov.on_side():
                    work = _sel_keys_backward(*sel, ctx.sel_work, dks, dvs)
                with ov.on_side(after=dq32_done):
                    _sel_dq_backward(*sel, dq32, work, dq)
            dkc, dvc, dkw, dvw = _range_keys_backward(q, k_cmp, v_cmp, k_win, v_win, do, lse_c, lse_w, delta,
                                                      geo, cfg, scale2, scale)
        finally:
            ov.join()
        return (dq, dkc, dvc, dks, dvs, dkw, dvw, dg.to(gates.dtype), None, None, None, None, None, None)


def packed_select(q, k_cmp, geo: Geometry, cfg, scale: float, v_cmp=None):
    """Top-n blocks for packed q [T, HQ, Dk], k_cmp [Nc, H, Dk]: LongTensor [T, H, n].

    With ``v_cmp`` the compressed branch's full forward runs (its output is needed anyway)
    and (idx, (o_cmp, lse_cmp)) is returned, else idx alone from a log-sum-exp-only pass.
    """
    s2 = scale * LOG2E
    if v_cmp is None:
        _, lse = _range_forward(0, q, k_cmp, k_cmp, geo, cfg, s2, lse_only=True)
        return select_from_lse(q, k_cmp, lse, geo, cfg, s2)
    o_c, lse = _range_forward(0, q, k_cmp, v_cmp, geo, cfg, s2)
    return select_from_lse(q, k_cmp, lse, geo, cfg, s2), (o_c, lse)


def pack(t: torch.Tensor) -> torch.Tensor:
    """[B, S, heads, D] -> contiguous [B*S, heads, D]."""
    return t.reshape(-1, t.shape[2], t.shape[3]).contiguous()


_GEOMETRIES: "OrderedDict[tuple, tuple]" = OrderedDict()  # (layout, tile-table cache) per packing
_GEOMETRY_SLOTS = 8


def make_geometry(q: torch.Tensor, k_cmp: torch.Tensor, v_sel: torch.Tensor, cfg,
                  cu_seqlens: Optional[torch.Tensor], q_start: int = 0, seq_len: Optional[int] = None) -> Geometry:
    """Packed geometry of a call (B sequences of S tokens become B documents).

    The document layout and its tile tables depend only on the packing, which repeats in
    every layer and step: they are built once on the host and copied to the device without
    blocking (``ops.blocks.to_device``), then reused. ``cu_seqlens`` is read on the host, so a CPU
    tensor (as ``nsa_dist.ops`` passes it) keeps the whole call free of GPU syncs.
    q_start, seq_len: q's Sq rows are positions [q_start, q_start + Sq) of each sequence of
    ``seq_len`` keys (default Sq: the queries are the keys); ``cu_seqlens`` describes the keys.
    """
    from nsa_dist.ops.blocks import compressed_offsets

    B, Sq, HQ, DK = q.shape
    S = Sq if seq_len is None else seq_len
    dev = q.device
    if cu_seqlens is None:
        bounds = [b * S for b in range(B + 1)]
        cbounds = [b * k_cmp.shape[1] for b in range(B + 1)]
    else:
        bounds = cu_seqlens.tolist()
        cbounds = compressed_offsets(bounds, cfg)
    key = (str(dev), B, S, k_cmp.shape[1], cfg.cmp_block, cfg.cmp_stride, tuple(bounds), q_start, Sq)
    hit = _GEOMETRIES.get(key)
    if hit is None:
        hit = (tl_tiles.make_layout(bounds, cbounds, dev, q_start, Sq, S), {})
        _GEOMETRIES[key] = hit
        while len(_GEOMETRIES) > _GEOMETRY_SLOTS:
            _GEOMETRIES.popitem(last=False)
    else:
        _GEOMETRIES.move_to_end(key)
    layout, cache = hit
    return Geometry(layout, HQ, k_cmp.shape[2], DK, v_sel.shape[3], cache=cache, dtype=q.dtype,
                    sel_block=cfg.sel_block, prec=dot_precision(q.dtype))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs as PyTorch computes fp32 matmuls, in full precision
    ("ieee") unless the user allows TF32 (``torch.backends.cuda.matmul.allow_tf32 = True`` or
    ``torch.set_float32_matmul_precision("high")``); 16-bit inputs: "tf32" (no effect on them)."""
    if dtype != torch.float32:
        return "tf32"
    allowed = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if allowed else "ieee"

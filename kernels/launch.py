"""Launch configuration of the NSA kernels: every tuning knob, checked, in one frozen object.

``LaunchConfig()`` holds the defaults (where each comes from: docs/kernel_notes.md, "Launch
configuration"). A call's geometry (``nsa.Geometry.launch``) carries one; the kernels read
nothing else. Sweeps and A/B runs build variants with ``replace(**overrides)`` and run a
call under ``use_launch(config)``. Unknown names and ill-typed values are refused when the
config is built, naming the valid choices.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Iterator, Optional

# (num_warps, num_stages) of one kernel launch
WarpsStages = tuple[int, int]

_CHOICES = {"sel_algo": ("auto", "block", "query"), "sel_dq_algo": ("auto", "block", "query", "fused"),
            "sel_dq_partial": ("auto", "fp32", "fp16s"), "head_dim_pieces": ("auto", "two", "one")}
# tile sides that enter tl.arange / tl.dot: powers of two (tl.dot needs >= 16)
_POW2 = {"select_rows": 1, "select_rows_aligned": 1, "select_keys": 1, "select_span": 1, "gate_rows": 1,
         "sel_combine_rows": 1, "range_fwd_keys": 16, "range_cmp_fwd_keys": 16, "range_dq_keys": 16, "dkdv_keys": 16, "dkdv_rows": 16}


# per-slot buffer bound of the block-major kernels (``LaunchConfig.split_bytes`` None): fewer,
# longer chunks of positions measured faster than 1 GiB (one H100, 64k): (d) Dk = 192 with the
# fused dq, backward 214 -> 196 ms (eighth session); (c) Dk = 128, forward + backward 87.8 ->
# 86.0 ms (tenth session; docs/benchmarks.md). Peak memory: +1 GiB where a call fills it
# ((d) 64k: 18.6 -> 19.6 GiB, seventh session)
SPLIT_BYTES = 1 << 31


@dataclass(frozen=True, init=False)
class LaunchConfig:
    """Tile sizes, algorithm choices and (num_warps, num_stages) of every NSA kernel.

    Build with keywords (``LaunchConfig(sel_seg_rows=2048)``) or ``from_dict``; derive with
    ``replace``. Rows are (position, query head) pairs: a program of R rows takes R // G
    positions of one KV head's group of G query heads.
    """

    # --- range kernels: compressed, window and forced selected blocks (range_attn.py)
    range_rows: int = 64  # rows per program of the range forward and dq
    range_fwd_rows: Optional[int] = None  # the range forward's own rows (None: range_rows)
    range_dq_rows: Optional[int] = None  # the range dq's own rows (None: range_rows)
    range_fwd_keys: int = 32  # keys per step of the range forward: 32 beat 64 at (c) 64k
    # the compressed branch's forward alone (its long key ranges, where the window's and the
    # forced blocks' are short), rows / keys per step / (warps, stages); None: the range
    # forward's. With TMA loads 64 keys a step took 2.5% off (a) 64k's forward and 1.9% off
    # (c)'s (``kcmp64``, two interleaved rounds in one process each, one H100, 2026-12-07);
    # 128 lost (docs/benchmarks.md)
    range_cmp_fwd_rows: Optional[int] = None
    range_cmp_fwd_keys: Optional[int] = 64
    range_dq_keys: int = 64  # keys per step of the range dq
    dkdv_keys: int = 64  # keys per program of the range dK/dV
    dkdv_rows: int = 64  # query rows per step of the range dK/dV
    dkdv_qchunk: int = 4096  # query positions per program of the compressed dK/dV (fp32 atomics)
    # programs wanted for the compressed dK/dV: where its grid would have fewer working ones
    # (short sequences: 8 key tiles a KV head at 8k), shorter query chunks, down to
    # first_min_chunk positions; None: dkdv_qchunk always. 512 took 7% off (c)'s backward at
    # 8k and 1% at 16k (one H100, 2026-12-07), but the 1b model at 8k stayed within its spread
    dkdv_programs: Optional[int] = None
    first_programs: int = 512  # programs wanted for block 0's dK/dV, or its few key tiles idle most SMs
    first_min_chunk: int = 256  # positions, at least, per query chunk of block 0's dK/dV
    # --- selected branch (selected_attn.py)
    sel_algo: str = "auto"  # selected forward: "block"-major, "query"(position)-major, or by G
    sel_query_min_g: int = 16  # "auto": position-major from this group size (K/V reuse per tile)
    # the same choice for the selected dq, or "fused": block-major, its per-slot dq written by the
    # selected dK/dV kernel (one gather of q / dO for both, one more product and a [rows, Dk]
    # temporary there; ``sel_dkdv_dq`` launch settings)
    sel_dq_algo: str = "auto"
    sel_dq_query_min_g: int = 16  # "auto": position-major dq from this group size
    # "auto": block-major dq fused into the dK/dV kernel from this key head dim (the wider q and
    # dO rows cost more to gather twice): (d) Dk = 192, G = 4, 64k backward 314.6 -> 213.7 ms
    # with acc_regs = 128; at Dk = 128 ((c), the 1b model) no gain (docs/kernel_notes.md)
    sel_dq_fused_min_dk: int = 160
    sel_forced: bool = True  # forced blocks (0, the two local) in the range kernels with full tiles
    sel_rows: int = 16  # rows per program of the position-major selected forward / dq
    # TMA loads (docs/kernel_notes.md, "TMA loads"; where a tile is one whole box of 16-bit,
    # aligned rows, Dk and Dv powers of two; else the pointer loads). One H100, 2026-12-07, 64k
    # (docs/benchmarks.md, thirteenth session): sel_tma + range_tma (a) forward -11.5%, backward
    # -8.5%; range_tma + dkdv_tma (c) forward -5.2%, backward -9.2%.
    # sel_tma: the position-major selected forward / dq read each chosen K / V block as one box
    sel_tma: bool = True
    # range_tma: the range forward and dq (compressed, window, forced blocks), one box a key tile
    range_tma: bool = True
    # dkdv_tma: the range dK/dV's q / dO rows of a step (whole positions x the G heads) as one box
    dkdv_tma: bool = True
    sel_seg_rows: int = 1024  # rows per work item of the block-major selected kernels
    sel_dkdv_seg_rows: int = 8192  # the same for a list only the selected dK/dV walks (G >= 16)
    sel_split_rows: int = 64  # rows per step of the block-major forward
    sel_dq_split_rows: int = 64  # rows per step of the block-major dq
    # rows per step of the selected dK/dV: 32 beat 64 on an H100 (backward at 64k: (c) 56.8 -> 55.6
    # ms, (a) 88.6 -> 85.7; docs/benchmarks.md, tenth session); 8 warps at 64 rows, which
    # builds without the 4-warp build's spills, lost 11%
    sel_dkdv_rows: int = 32
    sel_dkdv_dq_rows: int = 64  # the same for the fused dK/dV + dq kernel
    sel_combine_rows: int = 32  # rows per program of the per-slot merges (forward and dq)
    sel_dq_partial: str = "auto"  # block-major dq's per-slot dtype: "fp32", "fp16s" (scaled), or by input
    # bound of the block-major per-slot buffers (positions are chunked); None: SPLIT_BYTES (2 GiB)
    split_bytes: Optional[int] = None
    # L2 eviction hints in the block-major kernels: gathered q / dO rows "evict_last", per-slot
    # buffers "evict_first" (with small chunks a chunk's q can stay in L2 across the blocks
    # its positions chose); off: the hardware's default policy
    sel_l2_hints: bool = False
    # --- streams (CUDA): the selected branch's kernels (memory- and latency-bound at small G)
    # on a second stream: in the forward beside the window kernel (with a window), in the
    # backward beside the range dq and dK/dV; about 1% at G = 4 on an H100, and the side
    # stream's temporaries (up to split_bytes) live beside the main one's (docs/kernel_notes.md,
    # "Two streams for the branches"); side_priority: its CUDA priority (0 normal, -1 high)
    overlap_branches: bool = False
    side_priority: int = 0
    gate_rows: int = 32  # rows per program of the gate combination (gates.py)
    # The three fusions below, A/B at 64k on one H100 (2026-12-07, docs/benchmarks.md, sixteenth
    # session; two interleaved rounds, forward / backward means):
    # the gate combination in the selected branch's last kernel (its forward at G >= 16, its
    # per-slot merge below), which then reads the compressed and window outputs and writes the
    # layer's output: one pass over o_sel less, no separate launch. One stream only (with
    # ``overlap_branches`` the window may still be running there). Forward (a) -1.2%, (c) -1.3%
    gate_fused: bool = True
    # the window and the selected branch's forced blocks in one range-forward launch (q loaded
    # once, one launch less; each keeps its own keys and result). One stream only, as gate_fused.
    # None: from G = 16 (forward (a), G = 16: -1.4%; (c), G = 4: +1.3%, a loss about the rounds'
    # spread: off there until a gain is shown)
    window_forced: Optional[bool] = None
    # the gate backward (dg, and each branch's lse - log2 g and <do, o_b>) in the range dq's
    # prologue, the backward's first kernel, which loads do anyway: one launch and one read of
    # do less. One stream only (with ``overlap_branches`` the selected dK/dV starts beside it).
    # Backward (a) -4.3% (-1.7% with the other two), (c) within 0.4%
    gate_bwd_fused: bool = True
    # the inverted selection's ~90 small torch ops through torch.compile (None: on CUDA); each
    # call's launches cost host time that short contexts cannot hide
    compile_tables: Optional[bool] = None
    # --- block selection (selection.py)
    select_rows: int = 64  # rows per program with the general chunks
    select_rows_aligned: int = 128  # rows per program with chunks of whole blocks
    select_keys: int = 64  # compressed tokens per matrix product
    select_span: int = 1  # key tiles per top-n merge (spans > 1 lost in every sweep)
    select_aligned: bool = True  # chunks of whole blocks where (l, d, l') allow it
    select_merge: Optional[bool] = None  # tl.bitonic_merge top-n merge (None: when Triton has it)
    select: Optional[WarpsStages] = None  # None: 8 warps for merges wider than top-n, 3 stages aligned G < 16
    # the compressed key tiles through a TMA descriptor (as range_tma): 2-4% off the selection
    # at (a) and (c) 64k, nothing off the forward beyond the spread (one H100, 2026-12-07)
    select_tma: bool = False
    # --- shared memory: every kernel's tiles are shrunk until their estimate fits (``fit``)
    smem_bytes: int = 232448  # shared memory one program may use: Hopper's 227 KB
    # --- registers: a kernel whose fp32 accumulators (ACC_TILES) exceed this many registers a
    # thread runs with twice the warps, up to 8 (``acc_warps``); None: the warps as set. At the
    # paper's D = 128 no kernel exceeds 128 (128 changes nothing there); at Dk = 192 (in pieces)
    # the dK/dV kernels hold 160 and spill at 4 warps: 8 warps measured faster (with the fused
    # dq: (d) 64k backward 213.7 ms at 128, 225.5 at 64, 244 with the warps as set)
    acc_regs: Optional[int] = 128
    # --- register cap (ptxas .maxnreg) of the block-major selected split kernels, forward and
    # dq: every kernel builds at 255 registers a thread, two programs an SM; at 168 three fit
    # (with spills: `tools/kernel_spills.py`), more loads in flight for these memory-bound
    # kernels. None: the compiler's choice
    sel_split_regs: Optional[int] = None
    sel_dq_split_regs: Optional[int] = None
    # --- head dims: Dk in power-of-two column pieces (``headdim.split_dim``): "auto" three equal
    # ones where Dk is 3 x 2^k (192 = 3 x 64), else two where narrower than one padded tile (160 =
    # 128 + 32); "two" the latter always (192 = 128 + 64); "one" Dk padded (the A/B's base)
    head_dim_pieces: str = "auto"
    # --- (num_warps, num_stages) per kernel
    range_fwd: WarpsStages = (4, 3)
    range_cmp_fwd: Optional[WarpsStages] = None  # None: range_fwd's
    range_dq: WarpsStages = (4, 2)
    range_dkdv: WarpsStages = (4, 2)
    sel_fwd: WarpsStages = (4, 3)
    sel_dq: WarpsStages = (4, 3)
    sel_dkdv: WarpsStages = (4, 3)
    sel_split: WarpsStages = (4, 2)
    sel_combine: WarpsStages = (4, 1)
    sel_dq_split: WarpsStages = (4, 2)
    sel_dq_combine: WarpsStages = (4, 1)
    sel_dkdv_dq: WarpsStages = (8, 2)  # fused: dK, dV held with a dq temporary (8 warps: fewer spills)

    def __init__(self, **overrides):
        names = field_names()
        for key in overrides:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ValueError(f"LaunchConfig: unknown setting '{key}'; {hint}valid settings: {', '.join(names)}")
        for f in dataclasses.fields(self):
            value = overrides.get(f.name, f.default)
            object.__setattr__(self, f.name, tuple(value) if isinstance(value, list) else value)
        self._check()

    @classmethod
    def from_dict(cls, values: dict) -> "LaunchConfig":
        return cls(**values)

    def replace(self, **overrides) -> "LaunchConfig":
        """A copy with ``overrides`` (checked like construction)."""
        return type(self)(**{**self.to_dict(), **overrides})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def changed(self) -> dict:
        """The settings that differ from the defaults."""
        return {k: v for k, v in self.to_dict().items() if v != _DEFAULTS[k]}

    def warps_stages(self, kernel: str) -> WarpsStages:
        """``kernel``'s (num_warps, num_stages); ``range_cmp_fwd`` falls back on ``range_fwd``'s."""
        ws = getattr(self, kernel)
        return self.range_fwd if ws is None and kernel == "range_cmp_fwd" else ws

    def warps(self, kernel: str) -> dict:
        """``num_warps`` / ``num_stages`` keywords of ``kernel``'s launch."""
        w, s = self.warps_stages(kernel)
        return {"num_warps": w, "num_stages": s}

    def reg_cap(self, kernel: str) -> dict:
        """``maxnreg`` launch keyword of ``kernel`` where a register cap is set (``<kernel>_regs``),
        else none (the compiler's choice)."""
        cap = getattr(self, f"{kernel}_regs", None)
        return {} if cap is None else {"maxnreg": cap}

    def fit(self, kernel: str, rows: int, keys: int, bdk: int, bdv: int, elsize: int, stages: int,
            rows_min: int = 16, keys_min: int = 16, fixed: str = "") -> tuple[int, int, int]:
        """(rows, keys, stages) of ``kernel`` whose ``smem_estimate`` fits ``smem_bytes``.

        rows / keys: the tiles' BLOCK_M / BLOCK_N (powers of two), halved down to rows_min /
        keys_min unless named in ``fixed`` ("rows", "keys"); bdk / bdv: the head dims' tile widths
        (``SMEM_TILES``);
        elsize: bytes per input element. Each step takes the largest saving among halving the
        rows, halving the keys and one stage fewer (two stages kept while a tile can shrink).
        The default tiles of 16-bit inputs up to Dk = 256, Dv = 128 (G <= 16) fit unchanged.
        """
        def size(r, k, st):
            return smem_estimate(kernel, r, k, bdk, bdv, elsize, st)
        while size(rows, keys, stages) > self.smem_bytes:
            steps = []
            if "rows" not in fixed and rows // 2 >= rows_min:
                steps.append((rows // 2, keys, stages))
            if "keys" not in fixed and keys // 2 >= keys_min:
                steps.append((rows, keys // 2, stages))
            if stages > 2 or (stages > 1 and not steps):
                steps.append((rows, keys, stages - 1))
            if not steps:
                raise ValueError(
                    f"{kernel}: no tile fits {self.smem_bytes} B of shared memory with head dims {bdk}/{bdv} "
                    f"(tile widths) and {elsize}-byte inputs: {size(rows, keys, stages)} B at {rows} rows, {keys} "
                    f"keys, 1 stage. Use 16-bit inputs or smaller head dims (or a larger LaunchConfig.smem_bytes "
                    f"on a GPU that has it)")
            rows, keys, stages = min(steps, key=lambda t: (size(*t), -t[2]))
        return rows, keys, stages

    def acc_warps(self, kernel: str, rows: int, keys: int, bdk: int, bdv: int) -> int:
        """num_warps of ``kernel`` with BLOCK_M = rows, BLOCK_N = keys and head-dim tile widths bdk /
        bdv: its own, doubled (up to 8) while its fp32 accumulators (``ACC_TILES``) take more
        than ``acc_regs`` registers a thread (32 threads a warp, one register per fp32 element)."""
        warps = self.warps_stages(kernel)[0]
        if self.acc_regs is None or kernel not in ACC_TILES:
            return warps
        dims = {"m": rows, "n": keys, "k": bdk, "v": bdv}
        elems = sum(dims[a] * dims[b] for a, b in ACC_TILES[kernel])
        while warps < 8 and elems > self.acc_regs * 32 * warps:
            warps *= 2
        return warps

    def _check(self) -> None:
        for f in dataclasses.fields(self):
            name, v = f.name, getattr(self, f.name)
            default = f.default
            if name in _CHOICES:
                if v not in _CHOICES[name]:
                    raise ValueError(f"LaunchConfig.{name} must be one of {_CHOICES[name]}, got {v!r}")
            elif name in _WARPS_STAGES:
                if v is None and name in _OPTIONAL:
                    continue
                if (not isinstance(v, tuple) or len(v) != 2 or not all(_is_int(x) for x in v)
                        or v[0] not in (1, 2, 4, 8, 16, 32) or v[1] < 1):
                    raise ValueError(f"LaunchConfig.{name} must be (num_warps, num_stages): warps a power of two "
                                     f"1-32, stages >= 1, got {v!r}")
            elif name in ("sel_split_regs", "sel_dq_split_regs"):
                if v is not None and (not _is_int(v) or not 24 <= v <= 255):
                    raise ValueError(f"LaunchConfig.{name} must be None or an int 24-255 (registers a thread), "
                                     f"got {v!r}")
            elif name == "side_priority":
                if not _is_int(v) or v not in (0, -1):
                    raise ValueError(f"LaunchConfig.side_priority must be 0 (normal) or -1 (high), got {v!r}")
            elif isinstance(default, bool) or name in ("select_merge", "compile_tables", "window_forced"):
                if not isinstance(v, bool) and not (v is None and default is None):
                    auto = " or None (the automatic choice)" if default is None else ""
                    raise ValueError(f"LaunchConfig.{name} must be True or False{auto}, got {v!r}")
            else:  # ints (None allowed where the field is Optional)
                if v is None and name in _OPTIONAL:
                    continue
                if not _is_int(v) or v < 1:
                    raise ValueError(f"LaunchConfig.{name} must be a positive int, got {v!r}")
                low = _POW2.get(name)
                if low is not None and (v & (v - 1) or v < low):
                    raise ValueError(f"LaunchConfig.{name} must be a power of two >= {low}, got {v!r}")


# fields that take None (``Optional[...]``), and the (num_warps, num_stages) fields
_HINTS = typing.get_type_hints(LaunchConfig)
_OPTIONAL = {name for name, hint in _HINTS.items() if type(None) in typing.get_args(hint)}
_WARPS_STAGES = {name for name, hint in _HINTS.items() if hint == WarpsStages or WarpsStages in typing.get_args(hint)}


# Shared-memory tiles of each kernel with matrix products: per tile, its rows ("m": BLOCK_M
# query rows, "n": BLOCK_N keys) and columns ("k": Dk as its tiles hold it, one power of two or its
# pieces, ``headdim.split_dim``: 192 is 3 x 64; "v": Dv padded to a power of two).
# Resident tiles are loaded once per program; streamed ones once per pipeline stage.
SMEM_TILES = {
    # kernel: (resident, streamed)
    "range_fwd": (("mk",), ("nk", "nv")),
    "range_cmp_fwd": (("mk",), ("nk", "nv")),
    "range_dq": (("mk", "mv"), ("nk", "nv")),
    "range_dkdv": (("nk", "nv"), ("mk", "mv")),
    "sel_fwd": (("mk",), ("nk", "nv")),
    "sel_dq": (("mk", "mv"), ("nk", "nv")),
    "sel_split": (("nk", "nv"), ("mk",)),
    "sel_dq_split": (("nk", "nv"), ("mk", "mv")),
    "sel_dkdv": (("nk", "nv"), ("mk", "mv")),
    "sel_dkdv_dq": (("nk", "nv"), ("mk", "mv")),
    "select": (("mk",), ("nk",)),
}


# fp32 tiles each kernel keeps in registers across its loop (its accumulators), named as in
# SMEM_TILES: the output (forward), dq (dq kernels), dK and dV (dK/dV kernels).
ACC_TILES = {
    "range_fwd": ("mv",), "range_cmp_fwd": ("mv",), "range_dq": ("mk",), "range_dkdv": ("nk", "nv"),
    "sel_fwd": ("mv",), "sel_dq": ("mk",), "sel_split": ("mv",), "sel_dq_split": ("mk",),
    "sel_dkdv": ("nk", "nv"), "sel_dkdv_dq": ("nk", "nv"),
}


SMEM_SLACK = 4096  # bytes beside the tiles (Triton added 3072 in the case below: row vectors, barriers)


def smem_estimate(kernel: str, rows: int, keys: int, bdk: int, bdv: int, elsize: int, stages: int) -> int:
    """Bytes of shared memory ``kernel`` takes with BLOCK_M = rows, BLOCK_N = keys: resident tiles
    once and streamed tiles ``stages`` times, ``elsize`` bytes an element, plus SMEM_SLACK. For the
    selection kernel at 128 rows, 64 keys, 3 stages, Dk = 256 in fp32 (192 before it ran in two
    pieces) it gives 327680 + 4096 B where Triton reported 330752 (issue 25). The other kernels'
    figures are the same count (tools/kernel_spills.py prints Triton's for each launch)."""
    dims = {"m": rows, "n": keys, "k": bdk, "v": bdv}
    resident, streamed = SMEM_TILES[kernel]
    count = lambda tiles: sum(dims[a] * dims[b] for a, b in tiles)  # noqa: E731
    return elsize * (count(resident) + stages * count(streamed)) + SMEM_SLACK


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(LaunchConfig)]


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LaunchConfig)}
DEFAULT = LaunchConfig()
_current: contextvars.ContextVar[LaunchConfig] = contextvars.ContextVar("nsa_launch", default=DEFAULT)


def current_launch() -> LaunchConfig:
    """The launch configuration of calls made now (``DEFAULT`` outside ``use_launch``)."""
    return _current.get()


@contextlib.contextmanager
def use_launch(config: LaunchConfig) -> Iterator[LaunchConfig]:
    """Run the kernel calls made inside with ``config`` (their backward keeps it)."""
    if not isinstance(config, LaunchConfig):
        raise TypeError(f"use_launch takes a LaunchConfig, got {type(config).__name__}: build one with "
                        f"LaunchConfig(**settings)")
    token = _current.set(config)
    try:
        yield config
    finally:
        _current.reset(token)

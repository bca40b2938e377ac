"""ParallelState: the process groups of one layout, built once and passed explicitly.

Rank order (tensor parallel fastest, then Ulysses sequence parallel, then context parallel,
then data parallel)::

    rank = tp_rank + tp * (sp_rank + sp * (cp_rank + cp * dp_rank))

so the ranks of a TP group are consecutive (kept inside one node's NVLink domain), the Ulysses group
strides by ``tp``, the context-parallel group by ``tp * sp`` and the data-parallel group by
``tp * sp * cp``. Everything about the layout is
held by one ``ParallelState`` object; nothing is stored at module level, so two layouts can
live in one process (the tests build several) and no layer reaches a group implicitly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from ..config import ConfigBase


@dataclass(frozen=True)
class Layout:
    """Pure rank arithmetic of a (tp, sp, dp, cp) layout; no process groups are created."""

    world_size: int
    tp: int
    sp: int
    dp: int
    cp: int = 1

    def coords(self, rank: int) -> tuple[int, int, int]:
        """rank -> (tp_rank, sp_rank, dp_rank); the CP coordinate is ``cp_coord``."""
        return rank % self.tp, (rank // self.tp) % self.sp, rank // (self.tp * self.sp * self.cp)

    def cp_coord(self, rank: int) -> int:
        return (rank // (self.tp * self.sp)) % self.cp

    def rank_of(self, tp_rank: int, sp_rank: int, dp_rank: int, cp_rank: int = 0) -> int:
        return tp_rank + self.tp * (sp_rank + self.sp * (cp_rank + self.cp * dp_rank))

    def _groups(self, inner: str) -> list[list[int]]:
        """Groups that vary the coordinates named in ``inner`` (fastest last letter first:
        "t", "s", "c", "d"), one group per value of the others; ranks in rank order of the
        inner coordinates, groups in rank order of the outer ones."""
        sizes = {"t": self.tp, "s": self.sp, "c": self.cp, "d": self.dp}
        outer = [k for k in "dcst" if k not in inner]
        inner_keys = [k for k in "dcst" if k in inner]

        def ranks(fixed: dict) -> list[int]:
            out = []
            for combo in _product([sizes[k] for k in inner_keys]):
                c = {**fixed, **dict(zip(inner_keys, combo))}
                out.append(self.rank_of(c["t"], c["s"], c["d"], c["c"]))
            return out
        return [ranks(dict(zip(outer, combo))) for combo in _product([sizes[k] for k in outer])]

    def tp_groups(self) -> list[list[int]]:
        return self._groups("t")

    def sp_groups(self) -> list[list[int]]:
        return self._groups("s")

    def cp_groups(self) -> list[list[int]]:
        """Context-parallel groups: the ranks holding the zigzag shards of one sequence."""
        return self._groups("c")

    def seq_groups(self) -> list[list[int]]:
        """Ulysses x CP groups: every rank holding part of one replica's sequence (the loss
        and the gradients are summed over them)."""
        return self._groups("sc")

    def dp_groups(self) -> list[list[int]]:
        return self._groups("d")

    def sdp_groups(self) -> list[list[int]]:
        """Sequence-data-parallel groups (Ulysses x CP x DP): the ranks holding the same TP
        shard, over which ZeRO partitions and gradients are reduced."""
        return self._groups("scd")

    def head_groups(self) -> list[list[int]]:
        """TP x Ulysses groups: the ranks that split the attention heads of one replica and
        one CP shard. Listed in head-rank order ``tp_rank * sp + sp_rank`` (TP splits heads
        first, Ulysses splits each TP rank's heads again)."""
        return [[self.rank_of(t, s, d, c) for t in range(self.tp) for s in range(self.sp)]
                for d in range(self.dp) for c in range(self.cp)]

    def kv_share_groups(self, num_kv_heads: int) -> list[list[int]]:
        """Groups of ranks whose query heads belong to one KV head (only when tp*sp > H).

        Their partial group importance is summed before top-n (SPEC Eq. 10).
        """
        P = self.tp * self.sp
        if P <= num_kv_heads:
            return []
        per = P // num_kv_heads
        return [hg[i * per:(i + 1) * per] for hg in self.head_groups() for i in range(num_kv_heads)]

    def tp_kv_share_groups(self, num_kv_heads: int) -> list[list[int]]:
        """TP ranks holding a replica of the same KV projection (only when tp > H): the
        gradients of those replicated K/V weights are summed over them."""
        if self.tp <= num_kv_heads:
            return []
        per = self.tp // num_kv_heads
        return [g[i * per:(i + 1) * per] for g in self.tp_groups() for i in range(num_kv_heads)]


def _product(sizes: list[int]) -> list[tuple[int, ...]]:
    """All index tuples of ``sizes``, the last index fastest."""
    out = [()]
    for n in sizes:
        out = [t + (i,) for t in out for i in range(n)]
    return out


def check_layout(world_size: int, tp: int, sp: int, dp: Optional[int], cp: int = 1) -> Layout:
    """Validate sizes; raise ValueError naming them and what would work."""
    for name, v in (("world_size", world_size), ("tp", tp), ("sp", sp), ("cp", cp)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    inner = tp * sp * cp
    sym, vals = ("tp*sp*cp", f"{tp}*{sp}*{cp}") if cp > 1 else ("tp*sp", f"{tp}*{sp}")
    names = f"{sym} = {vals}"
    if dp is None:
        if world_size % inner:
            raise ValueError(
                f"world size {world_size} is not divisible by {names} = {inner}; "
                f"choose {'tp, sp and cp' if cp > 1 else 'tp and sp'} whose product divides {world_size} "
                f"(divisors: {[d for d in range(1, world_size + 1) if world_size % d == 0]})")
        dp = world_size // inner
    if not isinstance(dp, int) or dp < 1:
        raise ValueError(f"dp must be a positive integer, got {dp!r}")
    if inner * dp != world_size:
        raise ValueError(
            f"world size {world_size} != {sym}*dp = {vals}*{dp} = {inner * dp}; "
            f"set dp={world_size // inner} (or leave dp unset) when {sym} divides the world size")
    return Layout(world_size, tp, sp, dp, cp)


def check_model_layout(num_heads: int, num_kv_heads: int, tp: int, sp: int,
                       vocab_size: Optional[int] = None, seq_len: Optional[int] = None,
                       megatron_sp: bool = False) -> None:
    """Check that a model splits over (tp, sp); ValueError naming the sizes otherwise.

    Heads are split over P = tp * sp ranks: HQ must divide by P. TP splits the KV heads H
    first: H divisible by tp (whole groups per rank) or tp divisible by H (a group's query
    heads split over tp / H ranks, KV heads replicated); then Ulysses splits each TP rank's
    KV heads H_t = max(H / tp, 1) by the same rule. When P > H the group importance is
    summed over the P / H ranks of a group before top-n.
    """
    P = tp * sp

    def splits(h_kv: int, p: int) -> bool:
        return h_kv % p == 0 or p % h_kv == 0

    def works(t: int, s: int) -> bool:
        return (num_heads % (t * s) == 0 and splits(num_kv_heads, t)
                and splits(max(num_kv_heads // t, 1), s))

    ok = [(t, s) for t in range(1, num_heads + 1) for s in range(1, num_heads + 1) if works(t, s)]
    hint = ("; (tp, sp) pairs that work: " + ", ".join(f"({t}, {s})" for t, s in ok[:12])
            + (" ..." if len(ok) > 12 else ""))
    if num_heads % P:
        raise ValueError(f"num_heads={num_heads} is not divisible by tp*sp = {tp}*{sp} = {P}{hint}")
    if not splits(num_kv_heads, tp):
        raise ValueError(f"num_kv_heads={num_kv_heads} neither divides nor is divisible by "
                         f"tp={tp}{hint}")
    local_kv = max(num_kv_heads // tp, 1)
    if not splits(local_kv, sp):
        raise ValueError(f"each TP rank holds {local_kv} KV head(s) (num_kv_heads={num_kv_heads}, "
                         f"tp={tp}), which neither divides nor is divisible by sp={sp}{hint}")
    if vocab_size is not None and vocab_size % tp:
        raise ValueError(f"vocab_size={vocab_size} is not divisible by tp={tp}; pad the vocabulary "
                         f"to {-(-vocab_size // tp) * tp}")
    if seq_len is not None:
        check_seq_len(seq_len, tp, sp, megatron_sp)


class HeadLayout:
    """Which heads this rank holds: pure arithmetic (docs/parallelism.md, "Layouts").

    TP gives each rank HQ/tp query heads from ``q_start``. KV heads: H/tp per rank from
    ``kv_start`` when tp divides H; when H divides tp, the tp/H ranks of a group each hold a
    replica of its KV head. Ulysses then splits each TP rank's heads over sp ranks, repeating
    each TP-local KV head ``kv_repeat`` times first when they are fewer than sp.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, tp: int, sp: int, tp_rank: int, sp_rank: int):
        check_model_layout(num_heads, num_kv_heads, tp, sp)
        self.HQ, self.H, self.tp, self.sp = num_heads, num_kv_heads, tp, sp
        self.q_per_tp = num_heads // tp
        self.q_start = tp_rank * self.q_per_tp
        if tp <= num_kv_heads:
            self.kv_per_tp, self.kv_start = num_kv_heads // tp, tp_rank * (num_kv_heads // tp)
        else:
            self.kv_per_tp, self.kv_start = 1, tp_rank // (tp // num_kv_heads)
        # the first of the tp/H ranks holding a K/V replica counts it in gradient norms
        self.kv_first = tp <= num_kv_heads or tp_rank % (tp // num_kv_heads) == 0
        # Ulysses: repeat each TP-local KV head so that every sp rank gets at least one.
        self.kv_repeat = max(1, sp // self.kv_per_tp)
        self.q_local = self.q_per_tp // sp  # query heads attended on this rank
        self.kv_local = max(1, self.kv_per_tp // sp)
        P, hr = tp * sp, tp_rank * sp + sp_rank
        # Global KV heads attended on this rank (for gathering the selection back).
        self.kv_global_start = hr * num_kv_heads // P if P <= num_kv_heads else hr // (P // num_kv_heads)


def check_seq_len(seq_len: int, tp: int, sp: int, megatron_sp: bool) -> None:
    shards = sp * (tp if megatron_sp else 1)
    if seq_len % shards:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by the sequence-shard count {shards} "
            f"(sp={sp}" + (f" x tp={tp} for Megatron sequence parallel" if megatron_sp else "") +
            f"); use a length that is a multiple of {shards}, e.g. {-(-seq_len // shards) * shards}")


class ParallelState:
    """Process groups of a (tp, sp, cp, dp) layout for this rank.

    ``ParallelState(world_size, rank, tp=1, sp=1, dp=None, cp=1)``: ``dp`` defaults to
    ``world_size // (tp * sp * cp)``. ``cp``: context parallel (zigzag sequence shards,
    parallel/context.py); its group is ``cp_group``, and ``seq_group`` spans Ulysses x CP. Groups are created with ``torch.distributed.new_group``
    when the default process group is initialised (every rank must build the same states in
    the same order: ``new_group`` is collective); otherwise only the rank arithmetic is
    available (``create_groups=False`` forces that).
    """

    def __init__(self, world_size: int, rank: int, tp: int = 1, sp: int = 1, dp: Optional[int] = None,
                 create_groups: Optional[bool] = None, cp: int = 1):
        self.layout = check_layout(world_size, tp, sp, dp, cp)
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        self.world_size, self.rank = world_size, rank
        self.tp, self.sp, self.dp = self.layout.tp, self.layout.sp, self.layout.dp
        self.tp_rank, self.sp_rank, self.dp_rank = self.layout.coords(rank)
        self.cp, self.cp_rank = self.layout.cp, self.layout.cp_coord(rank)
        if create_groups is None:
            create_groups = dist.is_available() and dist.is_initialized()
        if create_groups:
            if dist.get_world_size() != world_size or dist.get_rank() != rank:
                raise ValueError(f"ParallelState(world_size={world_size}, rank={rank}) but "
                                 f"torch.distributed has world size {dist.get_world_size()} and "
                                 f"rank {dist.get_rank()}")
        self._has_groups = bool(create_groups)
        self._kv_groups: dict = {}  # lazily created groups, per (kind, num_kv_heads)
        L = self.layout
        self.tp_ranks, self.tp_group = self._make(L.tp_groups())
        self.sp_ranks, self.sp_group = self._make(L.sp_groups())
        self.dp_ranks, self.dp_group = self._make(L.dp_groups())
        self.sdp_ranks, self.sdp_group = self._make(L.sdp_groups())
        self.head_ranks, self.head_group = self._make(L.head_groups())
        self.cp_ranks, self.cp_group = self._make(L.cp_groups())
        # Ulysses x CP: the same as the Ulysses group without CP
        self.seq_ranks, self.seq_group = ((self.sp_ranks, self.sp_group) if self.cp == 1
                                          else self._make(L.seq_groups()))

    # -------------------------------------------------------------- groups
    def _make(self, groups: list[list[int]]):
        mine, handle = None, None
        for ranks in groups:  # every rank creates every group, in the same order
            g = dist.new_group(ranks) if self._has_groups else None
            if self.rank in ranks:
                mine, handle = ranks, g
        return mine, handle

    def kv_share_group(self, num_kv_heads: int):
        """(ranks, group) sharing this rank's KV head, or (None, None) when tp*sp <= H.

        Collective on first call for a given H (every rank must call it); cached after.
        """
        return self._cached(("kv", num_kv_heads), self.layout.kv_share_groups)

    def tp_kv_share_group(self, num_kv_heads: int):
        """(ranks, group) of TP ranks replicating this rank's KV projection, or (None, None)
        when tp <= H. Collective on first call for a given H; cached after."""
        return self._cached(("tp_kv", num_kv_heads), self.layout.tp_kv_share_groups)

    def _cached(self, key, make):
        if key not in self._kv_groups:
            self._kv_groups[key] = self._make(make(key[1]))
        return self._kv_groups[key]

    @property
    def head_parallel(self) -> int:
        """Ranks that split the heads of one replica: tp * sp."""
        return self.tp * self.sp

    @property
    def replica_size(self) -> int:
        """Ranks that hold one model replica's work (one data-parallel rank): tp * sp * cp."""
        return self.tp * self.sp * self.cp

    @property
    def head_rank(self) -> int:
        """This rank's position among the head-splitting ranks: tp_rank * sp + sp_rank."""
        return self.tp_rank * self.sp + self.sp_rank

    def __repr__(self) -> str:
        return (f"ParallelState(world_size={self.world_size}, rank={self.rank}, tp={self.tp}, "
                f"sp={self.sp}, cp={self.cp}, dp={self.dp}; tp_rank={self.tp_rank}, sp_rank={self.sp_rank}, "
                f"cp_rank={self.cp_rank}, dp_rank={self.dp_rank})")

    def mpu(self) -> "DeepSpeedMPU":
        """The object ``deepspeed.initialize(mpu=...)`` accepts for this layout."""
        if not self._has_groups:
            raise RuntimeError("ParallelState.mpu() needs process groups: call "
                               "torch.distributed.init_process_group before building the state")
        return DeepSpeedMPU(self)


class DeepSpeedMPU:
    """DeepSpeed's ``mpu`` protocol over a ParallelState.

    model parallel = tensor parallel (TP); data parallel = pure DP (ranks with the same TP,
    Ulysses and CP coordinates); sequence parallel = Ulysses x CP (every rank holding part of
    a replica's sequence); sequence-data parallel = Ulysses x CP x DP, which ZeRO partitions
    over and which gradients are reduced over (DeepSpeed sums over the sequence-parallel
    ranks: each holds its tokens' part of the gradient, and averages over DP). No pipeline
    parallelism.
    """

    def __init__(self, state: ParallelState):
        self.state = state

    # tensor / model parallel
    def get_model_parallel_rank(self): return self.state.tp_rank
    def get_model_parallel_world_size(self): return self.state.tp
    def get_model_parallel_group(self): return self.state.tp_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
    def get_tensor_model_parallel_src_rank(self): return self.state.tp_ranks[0]
    get_slice_parallel_rank = get_model_parallel_rank
    get_slice_parallel_world_size = get_model_parallel_world_size
    get_slice_parallel_group = get_model_parallel_group

    # data parallel
    def get_data_parallel_rank(self): return self.state.dp_rank
    def get_data_parallel_world_size(self): return self.state.dp
    def get_data_parallel_group(self): return self.state.dp_group
    def get_data_parallel_group_ranks(self): return list(self.state.dp_ranks)

    # Ulysses x context parallel
    def get_sequence_parallel_rank(self): return self.state.seq_ranks.index(self.state.rank)
    def get_sequence_parallel_world_size(self): return self.state.sp * self.state.cp
    def get_sequence_parallel_group(self): return self.state.seq_group

    # Ulysses x CP x data parallel
    def get_sequence_data_parallel_rank(self): return self.state.sdp_ranks.index(self.state.rank)
    def get_sequence_data_parallel_world_size(self): return self.state.sp * self.state.cp * self.state.dp
    def get_sequence_data_parallel_group(self): return self.state.sdp_group

    # no pipeline parallelism
    def get_pipeline_model_parallel_world_size(self): return 1
    def get_pipeline_model_parallel_rank(self): return 0
    def get_pipe_parallel_world_size(self): return 1
    def get_pipe_parallel_rank(self): return 0
    def get_pipeline_model_parallel_group(self): return None
    get_pipe_parallel_group = get_pipeline_model_parallel_group


@dataclass
class ParallelConfig(ConfigBase):
    """Config keys of a layout (for a trainer's YAML): ``tp`` (tensor parallel), ``sp``
    (Ulysses degree), ``cp`` (context parallel: zigzag sequence shards, parallel/context.py),
    ``megatron_sp`` (shard norms/residuals along the sequence inside TP),
    ``selection_comm`` ("auto", "importance" or "gather_q", see hooks.py). Data parallel
    is what remains of the world size."""

    tp: int = 1
    sp: int = 1
    cp: int = 1
    megatron_sp: bool = False
    selection_comm: str = "auto"

    def __post_init__(self) -> None:
        for name in ("tp", "sp", "cp"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r}: must be a positive integer")
        if not isinstance(self.megatron_sp, bool):
            raise ValueError(f"megatron_sp={self.megatron_sp!r}: must be true or false")
        if self.megatron_sp and self.sp > 1:
            raise ValueError(f"megatron_sp=true needs sp=1 (got sp={self.sp}): Ulysses already "
                             "shards the sequence")
        if self.selection_comm not in ("auto", "importance", "gather_q"):
            raise ValueError(f"selection_comm={self.selection_comm!r}: must be 'auto', 'importance' "
                             "or 'gather_q'")

    @property
    def replica_size(self) -> int:
        """Ranks per model replica: tp * sp * cp (the rest of the world is data parallel)."""
        return self.tp * self.sp * self.cp

    def check_model(self, model_cfg, world_size: int, seq_len: Optional[int] = None) -> None:
        """All start-up checks against a ModelConfig and the world size (ValueError)."""
        check_layout(world_size, self.tp, self.sp, None, self.cp)
        check_model_layout(model_cfg.num_heads, model_cfg.num_kv_heads, self.tp, self.sp,
                           model_cfg.vocab_size, None if self.cp > 1 else seq_len, self.megatron_sp)
        if self.cp > 1:
            check_context_parallel(model_cfg, seq_len, self.cp, self.sp, self.tp, self.megatron_sp)
        inner = model_cfg.ffn_size
        if inner % self.tp:
            raise ValueError(f"MLP width {inner} is not divisible by tp={self.tp}; set "
                             f"intermediate_size to a multiple of {self.tp}")

    def build_state(self, world_size: int, rank: int) -> ParallelState:
        return ParallelState(world_size, rank, tp=self.tp, sp=self.sp, cp=self.cp)


def check_context_parallel(model_cfg, seq_len: Optional[int], cp: int, sp: int = 1, tp: int = 1,
                           megatron_sp: bool = False) -> None:
    """What context parallelism (cp > 1) needs of the model and the sequence (ValueError)."""
    from .context import check_cp_seq_len

    if getattr(model_cfg, "attention", "nsa") != "nsa":
        raise ValueError(f"context parallel (cp={cp}) is implemented for NSA attention only; the "
                         f"model has attention={model_cfg.attention!r}: use cp=1 (TP / Ulysses) for it")
    if seq_len is not None:
        check_cp_seq_len(seq_len, cp, sp, tp, megatron_sp)

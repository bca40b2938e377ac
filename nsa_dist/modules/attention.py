"""NSAAttention: projections, RoPE, compression, gates and the NSA function as a layer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NSAConfig
from .. import ops
from .comm import AttentionComm, bound
from .compression import MLPCompressor
from .gate import GateMLP
from .rope import RotaryEmbedding, token_positions

BRANCHES = ("cmp", "sel", "win")


@dataclass
class AttentionStats:
    """What one NSA layer did in a forward pass (no gradients attached).

    gate_mean, gate_std: [3] (cmp, sel, win) over batch, positions and heads.
    tokens_read: [3] mean K/V positions read per query per branch (SPEC's counters).
    selected_blocks: [S, n] block indices of batch 0 for KV head ``stats_head`` (-1 padded),
    for heatmaps of (query position x block).
    """

    gate_mean: torch.Tensor
    gate_std: torch.Tensor
    tokens_read: torch.Tensor
    selected_blocks: torch.Tensor


def tokens_read(indices: torch.Tensor, positions: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """Mean distinct K/V positions read per query for each branch: [3] float64.

    indices: [B, S, H, n] selection; positions: [S] position of each query in its document.
    cmp reads Nc(t+1) tokens, sel the selected blocks clamped to <= t, win min(w, t+1).
    """
    t = positions.to(torch.float64)
    l, d, ls = config.cmp_block, config.cmp_stride, config.sel_block
    cmp = torch.where(t + 1 >= l, torch.floor((t + 1 - l) / d) + 1, torch.zeros_like(t))
    win = torch.clamp(t + 1, max=float(config.window))
    start = indices.clamp(min=0).to(torch.float64) * ls
    per_block = torch.clamp(torch.minimum(start + ls, t[None, :, None, None] + 1) - start, min=0)
    sel = (per_block * (indices >= 0)).sum(-1)  # [B, S, H]
    return torch.stack([cmp.mean(), sel.mean(), win.mean()])


class SelectionMemo:
    """The selections of one layer's forward, kept for its recomputation in the backward
    (full activation checkpointing recomputes the layer; the blocks it selects are the same,
    so the recomputation attends with these instead of running the selection again).

    Indices are stored in the narrowest integer type that holds the block count (int16 up
    to 32767 blocks): [B, S, H, n] at 64k tokens, 8 KV heads and n = 16 is 16 MB per layer.

    keep_outputs: also keep the NSA function's results per call (``forward_memo`` of
    ``ops.nsa_attention``: the branches' outputs and log-sum-exps), so that the recomputation
    runs no attention kernel (``recompute: keep_attention`` with the Triton kernels)."""

    def __init__(self, keep_outputs: bool = False):
        self._kept: dict = {}
        self._outputs: Optional[dict] = {} if keep_outputs else None

    def outputs(self, key) -> Optional[dict]:
        """The forward memo of call ``key`` (made empty on first use), or None without keep_outputs."""
        return None if self._outputs is None else self._outputs.setdefault(key, {})

    def get(self, key) -> Optional[torch.Tensor]:
        idx = self._kept.get(key)
        return None if idx is None else idx.long()

    def put(self, key, idx: torch.Tensor, num_blocks: int) -> None:
        if key not in self._kept:
            small = torch.int16 if num_blocks < 2 ** 15 else torch.int32
            self._kept[key] = idx.detach().to(small)


class NSAAttention(nn.Module):
    """Native Sparse Attention layer (SPEC.md).

    x: [B, S, hidden] -> [B, S, hidden]. Each branch has its own K/V projection unless
    ``config.shared_kv``; RoPE goes on q, k_sel, k_win and on k_cmp before compression.
    ``backend`` picks the NSA function's implementation ("auto", "reference", "triton");
    ``fused_projection``: one input GEMM for q, K/V and the gate (see ``_heads``). The
    forward reads heads off its projections (``view(B, S, -1, head_dim)``), so a plan may
    shard them in place; ``self.comm`` holds the plan's hooks (modules/comm.py).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 v_head_dim: int = 0, config: Optional[NSAConfig] = None, rope_theta: float = 10000.0,
                 backend: str = "auto", fused_projection: bool = True):
        super().__init__()
        config = config or NSAConfig()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.config = config
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim or head_dim
        self.backend, self.fused_projection = backend, fused_projection
        dk, dv = self.head_dim, self.v_head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * dk, bias=False)
        kv_names = ("shared",) if config.shared_kv else BRANCHES
        self.k_proj = nn.ModuleDict({b: nn.Linear(hidden_size, num_kv_heads * dk, bias=False) for b in kv_names})
        self.v_proj = nn.ModuleDict({b: nn.Linear(hidden_size, num_kv_heads * dv, bias=False) for b in kv_names})
        if config.phi == "mlp":
            self.phi_k = MLPCompressor(config.cmp_block, dk, config.phi_hidden, config.cmp_stride)
            self.phi_v = MLPCompressor(config.cmp_block, dv, config.phi_hidden, config.cmp_stride)
        else:
            self.phi_k = self.phi_v = None
        self.gate = GateMLP(hidden_size, num_heads, config.gate_hidden)
        self.o_proj = nn.Linear(num_heads * dv, hidden_size, bias=False)
        self.rope = RotaryEmbedding(dk, rope_theta)
        self.comm = AttentionComm()  # a parallel plan replaces it (modules/comm.py)

    def _heads(self, x: torch.Tensor, positions: torch.Tensor, fused: Optional[bool] = None, cmp_chunk: int = 1):
        """x [B, S_l, hidden] (a region's input), positions of the whole sequence -> (q
        [B, S, HQ', Dk], branch -> (k, v) [B, S, H', D], gates [B, S, HQ', 3], (phi_k, phi_v)):
        the heads this rank attends with over the whole sequence, RoPE on q and the keys.

        Fused (``fused_projection``): one GEMM over the concatenated weights of q, every
        distinct K/V projection and the gate's first layer (stored apart, hooks applied
        first), then one call (``split_columns``) that writes q and each key rotated, each value
        and the gate's activated first layer as separate contiguous tensors (the kernels then
        copy nothing). cmp_chunk > 1 (``_cmp_chunk``; fused only): the compressed branch's k
        and v come as phi's chunks [B, S / d, H', d, D] instead, which phi's GEMM takes
        without the transposing copy (forward, recomputation and their gradients)."""
        c = self.comm
        B, S_l, _ = x.shape
        dk, dv = self.head_dim, self.v_head_dim
        names = list(self.k_proj)
        kvw = c.kv_weights(*(self.k_proj[n].weight for n in names), *(self.v_proj[n].weight for n in names))
        kw, vw = kvw[:len(names)], kvw[len(names):]
        phi_params = [] if self.phi_k is None else [*self.phi_k.parameters(), *self.phi_v.parameters()]
        w1, b1, *phi_params = c.shared(self.gate.fc1.weight, self.gate.fc1.bias, *phi_params)
        phis = (None, None)
        if self.phi_k is not None:  # phi is used for every head: its parameters are shared
            n = len(phi_params) // 2
            phis = (bound(self.phi_k, phi_params[:n]), bound(self.phi_v, phi_params[n:]))
        cos, sin = self.rope.cos_sin(c.local_positions(positions), x.dtype)
        wq = self.q_proj.weight
        if self.fused_projection if fused is None else fused:
            weights = [wq, *kw, *vw, w1]
            rows = [w.shape[0] for w in weights]
            n_qk = 1 + len(kw)  # q and the keys come first: rotated; the values copied
            kinds = ["rope"] * n_qk + ["copy"] * len(vw) + ["silu"]
            chunked = [cmp_chunk > 1 and n == "cmp" for n in names]  # per K/V projection
            chunks = [1] + [cmp_chunk if is_c else 1 for is_c in chunked] * 2 + [1]
            # each piece its own contiguous tensor (the gate's activated) from one kernel, whose
            # backward writes the projection's whole gradient (no split/cat, and the NSA
            # kernels take every piece without a copy)
            q, *ks_vs, h = self.rope.split_columns(F.linear(x, torch.cat(weights)), cos, sin, rows, kinds, b1, chunks)
            q = q.unflatten(-1, (-1, dk))
            ks = [k if is_c else k.unflatten(-1, (-1, dk)) for k, is_c in zip(ks_vs[:n_qk - 1], chunked)]
            vs = [v if is_c else v.unflatten(-1, (-1, dv)) for v, is_c in zip(ks_vs[n_qk - 1:], chunked)]
            gates = self.gate.output(h)
        else:
            q = self.rope.rotate(F.linear(x, wq).unflatten(-1, (-1, dk)), cos, sin)
            ks = [self.rope.rotate(F.linear(x, w).unflatten(-1, (-1, dk)), cos, sin) for w in kw]
            vs = [F.linear(x, w).unflatten(-1, (-1, dv)) for w in vw]
            gates = self.gate.gates(F.linear(x, w1, b1))
        gates = c.to_heads(gates)
        # (chunked K/V only where to_heads leaves K/V as they are: ``_cmp_chunk``)
        kv = {n: (c.to_heads(k, kv=True), c.to_heads(v, kv=True)) for n, k, v in zip(names, ks, vs)}
        kv = {b: kv["shared" if self.config.shared_kv else b] for b in BRANCHES}
        return c.to_heads(q), kv, gates, phis

    def _compress(self, q, kv, gates, phis, cu_seqlens) -> dict[str, torch.Tensor]:
        """The NSA function's inputs: the cmp branch's keys and values compressed with phi."""
        out = {"q": q, "gates": gates}
        for branch, (k, v) in kv.items():
            if branch == "cmp" and k.dim() == 5:  # phi's chunks (``_heads``' cmp_chunk)
                k, v = phis[0](k, True), phis[1](v, True)
            elif branch == "cmp":
                # phi takes each document's keys whole (MLPCompressor.sequence), not its blocks
                k = ops.compress(k, self.config, phis[0], cu_seqlens, phi_takes_sequence=True)
                v = ops.compress(v, self.config, phis[1], cu_seqlens, phi_takes_sequence=True)
            out[f"k_{branch}"], out[f"v_{branch}"] = k, v
        return out

    def project(self, x: torch.Tensor, positions: torch.Tensor,
                cu_seqlens: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Everything the NSA function takes, from the hidden states.

        x: [B, S, hidden]; positions: [S] or [B, S]. Returns q [B, S, HQ, Dk], k_cmp/v_cmp
        [B, Nc, H, D], k_sel/v_sel/k_win/v_win [B, S, H, D], gates [B, S, HQ, 3].
        """
        return self._compress(*self._heads(x, positions, cmp_chunk=self._cmp_chunk(x.shape[1], cu_seqlens)),
                              cu_seqlens)

    def _cmp_chunk(self, seq_in: int, cu_seqlens: Optional[torch.Tensor]) -> int:
        """The stride d where the fused projection may write the compressed branch's K/V as
        phi's chunks (``_heads``), else 1: phi an MLP over blocks of whole chunks, one
        document (d dividing its length), its own K/V (not shared with the other branches),
        equal head dims (the split's items are heads), K/V not moved by the plan."""
        cfg, d = self.config, self.config.cmp_stride
        ok = (self.fused_projection and self.phi_k is not None and cfg.cmp_block % d == 0 and not cfg.shared_kv
              and cu_seqlens is None and seq_in % d == 0 and self.head_dim == self.v_head_dim
              and self.comm.kv_local())
        return d if ok else 1

    # Incremental decoding (nsa_dist/inference) caches the branches' keys before compression
    # and projects one token per step: the two halves of ``project``, public.
    def project_heads(self, x: torch.Tensor, positions: torch.Tensor, fused: Optional[bool] = None):
        """``project`` before compression: x [B, S, hidden] at positions [S] or [B, S] ->
        (q [B, S, HQ, Dk], {branch: (k [B, S, H, Dk], v [B, S, H, Dv])} for "cmp", "sel" and
        "win" (keys RoPE'd, "cmp" not yet compressed), gates [B, S, HQ, 3], (phi_k, phi_v):
        callables [B, N, H, l, D] -> [B, N, H, D], None for mean pooling).

        fused: use (True) or skip (False) the fused input GEMM for this call only (default
        ``fused_projection``); a single token is cheaper unfused, since the fused path
        concatenates every projection weight per call. The values are the same products."""
        return self._heads(x, positions, fused)

    def compress_heads(self, q: torch.Tensor, kv: dict, gates: torch.Tensor, phis,
                       cu_seqlens: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """``project_heads``' output -> ``project``'s dict: the "cmp" keys and values
        compressed with phi to k_cmp/v_cmp [B, Nc, H, D], the others passed through."""
        return self._compress(q, kv, gates, phis, cu_seqlens)

    def prepare(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """The layer up to the NSA function: x [B, S_in, hidden] -> ``project``'s dict (this
        rank's heads, the whole sequence) plus "positions" [S] or [B, S]."""
        if x.dim() != 3:
            raise ValueError(f"NSAAttention expects x of shape [B, S, hidden], got {tuple(x.shape)}")
        x = self.comm.enter(x)
        positions = token_positions(self.comm.seq_len(x.shape[1]), x.device, cu_seqlens, position_ids)
        p = self.project(x, positions, cu_seqlens)
        p["positions"] = positions
        return p

    def keeps_outputs(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether ``recompute: keep_attention`` keeps only the NSA function's results here (the
        Triton kernels take a ``forward_memo``), not its inputs too (the reference)."""
        return ops.resolve_backend(self.backend, torch.device(device), dtype) == "triton"

    def kept_bytes(self, batch: int, seq_in: int, dtype: torch.dtype, device=None) -> int:
        """Bytes ``recompute: keep_attention`` keeps for one call on x [batch, seq_in, hidden]
        (this rank's heads). With the kernels (``keeps_outputs`` on ``device``): the three branch
        outputs in ``dtype``, their fp32 log-sum-exps, the int16 indices and the selected
        branch's work list (13 bytes a choice). Else: also q, the selected and window K/V, o and
        the gates (compressed K/V: 1/d, left out)."""
        dk, dv = self.head_dim, self.v_head_dim
        hq = self.q_proj.weight.shape[0] // dk
        h = max(1, hq // (self.num_heads // self.num_kv_heads))
        el, n = dtype.itemsize, self.config.num_selected
        if device is not None and self.keeps_outputs(device, dtype):
            per = el * 3 * hq * dv + 4 * 3 * hq + (2 + 13) * h * n
        else:
            per = el * (hq * (dk + 4 * dv + 3) + 2 * h * (dk + dv)) + 4 * (3 * hq + h * n)
        return batch * self.comm.seq_len(seq_in) * per

    def attend(self, p: dict[str, torch.Tensor], cu_seqlens: Optional[torch.Tensor] = None,
               memo: Optional[SelectionMemo] = None):
        """The NSA function and its selection in one op call (the compressed branch's forward
        feeds the selection). Returns (o [B, S, HQ, Dv], indices [B, S, H, n]).

        memo: a ``SelectionMemo`` shared by a forward and its recomputation (activation
        checkpointing): the first call records each selection, the recomputation attends
        with it instead of selecting again (the same indices: the selection is exact)."""
        kv = (p["k_cmp"], p["v_cmp"], p["k_sel"], p["v_sel"], p["k_win"], p["v_win"])

        def attend(reduce_importance=None, block_indices=None, rows=slice(None), q_start=0):
            # rows/q_start: a chunk of the queries at its offset of the keys (context parallel)
            key = ("attend", rows.start, rows.stop, q_start)
            selects = block_indices is None  # the call selects: what the memo records
            if selects and memo is not None:
                block_indices = memo.get(key)
            o, idx = ops.nsa_attention(p["q"][:, rows], *kv, p["gates"][:, rows], self.config,
                                       cu_seqlens=cu_seqlens, backend=self.backend,
                                       block_indices=block_indices, reduce_importance=reduce_importance,
                                       canonical_indices=block_indices is not None, return_indices=True,
                                       q_start=q_start, forward_memo=None if memo is None else memo.outputs(key))
            if selects and memo is not None:
                memo.put(key, idx, p["k_sel"].shape[1] // self.config.sel_block)
            return o, idx

        def select(q, reduce_importance, q_start=0):
            key = ("select", q_start)
            kept = None if memo is None else memo.get(key)
            if kept is not None:
                return kept  # the recomputation skips the selection and its collectives
            idx = ops.select_blocks(q, p["k_cmp"], self.config, cu_seqlens=cu_seqlens,
                                    reduce_importance=reduce_importance, backend=self.backend,
                                    q_start=q_start, seq_len=p["k_sel"].shape[1])
            if memo is not None:
                memo.put(key, idx, p["k_sel"].shape[1] // self.config.sel_block)
            return idx
        return self.comm.attend(p["q"], attend, select)

    def finish(self, o: torch.Tensor) -> torch.Tensor:
        """The attention output [B, S, HQ', Dv] -> y [B, S_in, hidden]."""
        return self.comm.exit(self.o_proj(self.comm.from_heads(o).flatten(2)))

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, return_stats: bool = False,
                stats_head: int = 0, return_indices: bool = False,
                selection_memo: Optional[SelectionMemo] = None):
        """x: [B, S_in, hidden] -> (y [B, S_in, hidden], extra).

        cu_seqlens / position_ids describe the whole sequence (packed documents: B = 1,
        positions restart per document). S_in is S on one device; under a plan, this rank's
        sequence shard (see ``self.comm``). extra: AttentionStats of the heads this rank
        attends with if ``return_stats``, the selection [B, S, H', n] if ``return_indices``,
        else None. selection_memo: see ``attend`` (a checkpointed layer's recomputation).
        """
        p = self.prepare(x, cu_seqlens, position_ids)
        o, idx = self.attend(p, cu_seqlens, selection_memo)
        y = self.finish(o)
        if return_stats:
            return y, self.stats(p["gates"], idx, p["positions"], stats_head)
        return y, (idx if return_indices else None)

    def stats(self, gates: torch.Tensor, idx: torch.Tensor, positions: torch.Tensor,
              stats_head: int = 0) -> AttentionStats:
        with torch.no_grad():
            gates, idx = self.comm.query_rows(gates.detach()), self.comm.query_rows(idx)  # all queries
            g = gates.float().reshape(-1, 3)
            pos = positions if positions.dim() == 1 else positions[0]
            return AttentionStats(
                gate_mean=g.mean(0).cpu(), gate_std=g.std(0, unbiased=False).cpu(),
                tokens_read=tokens_read(idx, pos, self.config).cpu(),
                selected_blocks=idx[0, :, min(stats_head, idx.shape[2] - 1)].cpu())

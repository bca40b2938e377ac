"""Per-branch K/V caches of one NSA layer for incremental decoding (SPEC.md).

Each branch keeps what its decode step reads, and nothing more:

- selection: every position's ``k_sel/v_sel`` (any block may be selected), ``[B, C, H, D]``
  with the capacity ``C`` rounded up to whole selection blocks so that a block index picks
  one contiguous slice;
- window: a ring of the last ``w`` positions of ``k_win/v_win``, slot ``pos % w``;
- compression: a ring of the last ``l`` raw (RoPE'd, uncompressed) ``k_cmp/v_cmp``, slot
  ``pos % l``, and the emitted compressed tokens ``[B, Nc(max_len), H, D]``. Token
  ``i = (S - l) / d`` is emitted (phi applied once, on emission) when a sequence reaches
  length ``S >= l`` with ``(S - l) % d == 0``: exactly when it becomes visible.

Batches hold sequences of different lengths (``lengths [B]``); every sequence starts at
position 0 (prompts are right-padded), so positions equal cache indices and the block
geometry is the same as in a full forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config import NSAConfig
from ..ops.blocks import num_compressed

Phi = Optional[Callable[[torch.Tensor], torch.Tensor]]


def _phi_apply(phi: Phi, blocks: torch.Tensor) -> torch.Tensor:
    """blocks [B, N, H, l, D] -> tokens [B, N, H, D] (mean pooling when phi is None)."""
    return blocks.mean(dim=-2) if phi is None else phi(blocks)


@dataclass
class LayerCache:
    """K/V caches of one NSA layer for a batch of B sequences (see the module docstring).

    lengths: [B] int64, tokens cached per sequence. Shapes: k_sel/v_sel [B, C, H, Dk/Dv];
    k_win/v_win [B, w, H, D] (None when w = 0); k_raw/v_raw [B, l, H, D];
    k_cmp/v_cmp [B, Nc(max_len), H, D].
    """

    config: NSAConfig
    max_len: int
    lengths: torch.Tensor
    k_sel: torch.Tensor
    v_sel: torch.Tensor
    k_win: Optional[torch.Tensor]
    v_win: Optional[torch.Tensor]
    k_raw: torch.Tensor
    v_raw: torch.Tensor
    k_cmp: torch.Tensor
    v_cmp: torch.Tensor
    # Longest sequence as the host knows it (-1: unknown), so that the capacity check of a
    # decode step needs no GPU sync (and can sit outside a CUDA graph's replay).
    host_max: int = -1

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, config: NSAConfig, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
              v_head_dim: int, device=None, dtype: torch.dtype = torch.float32) -> "LayerCache":
        """Zero-filled caches for ``batch`` sequences of at most ``max_len`` tokens."""
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        H, Dk, Dv = num_kv_heads, head_dim, v_head_dim
        ls, l, w = config.sel_block, config.cmp_block, config.window
        cap = -(-max_len // ls) * ls
        z = lambda n, d: torch.zeros(batch, n, H, d, device=device, dtype=dtype)  # noqa: E731
        nc = num_compressed(max_len, config)
        return cls(config=config, max_len=max_len,
                   lengths=torch.zeros(batch, dtype=torch.long, device=device),
                   k_sel=z(cap, Dk), v_sel=z(cap, Dv),
                   k_win=z(w, Dk) if w else None, v_win=z(w, Dv) if w else None,
                   k_raw=z(l, Dk), v_raw=z(l, Dv), k_cmp=z(nc, Dk), v_cmp=z(nc, Dv))

    @property
    def batch(self) -> int:
        return self.k_sel.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.k_sel.dtype

    @property
    def device(self) -> torch.device:
        return self.k_sel.device

    def set_lengths(self, lengths: torch.Tensor) -> None:
        """Declare ``lengths`` [B] tokens cached (in place: a captured CUDA graph keeps reading
        the same tensor). Syncs once to learn the longest on the host."""
        if lengths.shape != (self.batch,):
            raise ValueError(f"lengths must have shape [{self.batch}], got {tuple(lengths.shape)}")
        self.lengths.copy_(lengths)
        self.host_max = int(self.lengths.max())

    def check_room(self) -> None:
        """ValueError when some sequence is full (host-side: no GPU sync once lengths are known)."""
        if self.host_max < 0:
            self.host_max = int(self.lengths.max())
        if self.host_max >= self.max_len:
            full = (self.lengths >= self.max_len).nonzero().flatten().tolist()
            raise ValueError(f"cannot decode past max_len={self.max_len}: sequence(s) {full} are full; "
                             "build the cache with a larger max_len (model.config.max_seq_len)")

    def check_input(self, x: torch.Tensor, name: str = "x") -> None:
        """ValueError when x's dtype or device differs from the caches' (before anything is written)."""
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but the cache on {self.device}; move the model "
                             "and its inputs to one device (or build the cache there with prefill)")
        if x.dtype != self.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but the cache {self.dtype}; run the model in "
                             "the cache's dtype (or prefill again after model.to(dtype))")

    @property
    def num_kv_heads(self) -> int:
        return self.k_sel.shape[2]

    def check_layer(self, config: NSAConfig, num_kv_heads: int, head_dim: int, v_head_dim: int) -> None:
        """ValueError when this cache was built for another layer configuration."""
        if config != self.config:
            raise ValueError(f"this cache was built for NSAConfig {self.config}, but the layer uses "
                             f"{config}; build a new cache with prefill() for this model")
        got = (self.k_sel.shape[2], self.k_sel.shape[3], self.v_sel.shape[3])
        if got != (num_kv_heads, head_dim, v_head_dim):
            raise ValueError(f"cache has (kv heads, head_dim, v_head_dim) = {got}, the layer "
                             f"{(num_kv_heads, head_dim, v_head_dim)}; build a new cache for this model")

    # ------------------------------------------------------------------ writes
    def fill(self, k: dict[str, torch.Tensor], lengths: torch.Tensor) -> None:
        """Load a right-padded prompt: k holds raw per-position ``k_sel, v_sel, k_win, v_win,
        k_raw, v_raw`` [B, P, H, D] and compressed ``k_cmp, v_cmp`` [B, Nc(P), H, D].

        Sequence b keeps positions < lengths[b]; compressed tokens it cannot see yet
        (i >= Nc(lengths[b])) are zeroed and re-emitted by ``append`` when they become visible.
        """
        B, P = k["k_sel"].shape[:2]
        if lengths.shape != (B,):
            raise ValueError(f"lengths must have shape [{B}], got {tuple(lengths.shape)}")
        if int(lengths.min()) < 1 or int(lengths.max()) > P:
            raise ValueError(f"every length must be in [1, {P}] (the padded prompt length), got "
                             f"{lengths.tolist()}")
        if P > self.max_len:
            raise ValueError(f"prompt of {P} tokens exceeds the cache's max_len={self.max_len}; "
                             "raise max_len (model.config.max_seq_len) or shorten the prompt")
        lengths = lengths.to(self.lengths.device, torch.long)
        keep = (torch.arange(P, device=lengths.device)[None, :] < lengths[:, None])[..., None, None]
        self.k_sel[:, :P] = k["k_sel"] * keep
        self.v_sel[:, :P] = k["v_sel"] * keep
        if self.k_win is not None:
            self._fill_ring(self.k_win, self.v_win, k["k_win"], k["v_win"], lengths)
        self._fill_ring(self.k_raw, self.v_raw, k["k_raw"], k["v_raw"], lengths)
        nc = k["k_cmp"].shape[1]
        seen = torch.arange(nc, device=lengths.device)[None, :] < _nc(lengths, self.config)[:, None]
        self.k_cmp[:, :nc] = k["k_cmp"] * seen[..., None, None]
        self.v_cmp[:, :nc] = k["v_cmp"] * seen[..., None, None]
        self.lengths.copy_(lengths)
        self.host_max = int(lengths.max())

    @staticmethod
    def _fill_ring(ring_k, ring_v, src_k, src_v, lengths) -> None:
        """Copy positions lengths-R .. lengths-1 (those >= 0) into slots pos % R."""
        R = ring_k.shape[1]
        pos = lengths[:, None] - R + torch.arange(R, device=lengths.device)[None, :]  # [B, R]
        ok = (pos >= 0)[..., None, None]
        src = pos.clamp(min=0)
        b = torch.arange(lengths.shape[0], device=lengths.device)[:, None]
        slots = pos % R  # R consecutive positions: a permutation of the slots
        ring_k[b, slots] = src_k[b, src] * ok
        ring_v[b, slots] = src_v[b, src] * ok

    def append(self, k: dict[str, torch.Tensor], phi_k: Phi, phi_v: Phi) -> torch.Tensor:
        """Write one new token per sequence at position lengths[b], emit compressed tokens.

        k: ``k_sel, v_sel, k_win, v_win, k_raw, v_raw`` each [B, H, D] (RoPE'd keys).
        Returns the emission mask [B] (bool) and advances lengths by one (in place).
        """
        self.check_room()
        pos = self.lengths.clone()
        b = torch.arange(self.batch, device=pos.device)
        self.k_sel[b, pos], self.v_sel[b, pos] = k["k_sel"], k["v_sel"]
        if self.k_win is not None:
            w = self.k_win.shape[1]
            self.k_win[b, pos % w], self.v_win[b, pos % w] = k["k_win"], k["v_win"]
        l = self.config.cmp_block
        self.k_raw[b, pos % l], self.v_raw[b, pos % l] = k["k_raw"], k["v_raw"]
        emit = self.emit(phi_k, phi_v, pos + 1)
        self.advance()
        return emit

    def advance(self) -> None:
        """lengths += 1, on the device and in the host's count."""
        self.lengths.add_(1)
        if self.host_max >= 0:
            self.host_max += 1

    def emit(self, phi_k: Phi, phi_v: Phi, S: torch.Tensor) -> torch.Tensor:
        """Compressed token (S - l) / d of every sequence whose new length S [B] makes it due
        (S >= l, (S - l) % d == 0), from the raw ring (which holds positions S-l .. S-1).

        Masked tensor ops, no host sync: phi runs for every sequence and only the due ones
        are written. Returns the emission mask [B].
        """
        l, d = self.config.cmp_block, self.config.cmp_stride
        emit = (S >= l) & ((S - l) % d == 0)
        nc = self.k_cmp.shape[1]
        if nc == 0:
            return emit
        b = torch.arange(self.batch, device=S.device)
        slots = (S[:, None] - l + torch.arange(l, device=S.device)[None, :]) % l  # [B, l] in order
        i = ((S - l) // d).clamp(0, nc - 1)
        for raw, out, phi in ((self.k_raw, self.k_cmp, phi_k), (self.v_raw, self.v_cmp, phi_v)):
            blocks = raw[b[:, None], slots].permute(0, 2, 1, 3)[:, None]  # [B, 1, H, l, D]
            new = _phi_apply(phi, blocks)[:, 0].to(out.dtype)
            out[b, i] = torch.where(emit[:, None, None], new, out[b, i])
        return emit


def _nc(lengths: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """Nc(S) elementwise for a LongTensor of lengths."""
    l, d = config.cmp_block, config.cmp_stride
    return torch.where(lengths >= l, (lengths - l) // d + 1, torch.zeros_like(lengths))

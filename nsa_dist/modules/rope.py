"""Rotary position embedding (RoPE), with positions that restart per packed document."""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Callable, Optional

import torch

from ..ops.blocks import to_device


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int,
                                 device: Optional[torch.device] = None) -> torch.Tensor:
    """Positions 0.. restarting at every document boundary: [S] int64 on ``device``
    (default: cu_seqlens' device). They are computed where cu_seqlens lives; a CPU one is
    moved through pinned memory, so the host does not wait for the GPU."""
    pos = torch.arange(seq_len, device=cu_seqlens.device)
    starts = cu_seqlens[:-1].long()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    out = pos - torch.repeat_interleave(starts, lengths, output_size=seq_len)
    return out if device is None else to_device(out, device)


# Every layer of a step asks for the same positions and rotation tables: they are built once
# (a dozen small kernels a layer otherwise) and shared, read-only. Keys hold what the values
# depend on; inference tensors are kept apart (autograd refuses to save them).
_TABLES: "OrderedDict[tuple, object]" = OrderedDict()
_TABLE_SLOTS = 16


def _table(key: tuple, build: Callable[[], object]):
    key = key + (torch.is_inference_mode_enabled(),)
    hit = _TABLES.get(key)
    if hit is None:
        hit = _TABLES[key] = build()
        while len(_TABLES) > _TABLE_SLOTS:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return hit


def token_positions(seq_len: int, device: torch.device, cu_seqlens: Optional[torch.Tensor] = None,
                    position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RoPE positions of a whole sequence of ``seq_len`` tokens: ``position_ids`` ([S] or
    [B, S]) as given, else 0.. restarting at every document of ``cu_seqlens``, else 0..S-1.
    The last two are shared between calls with the same arguments (a CPU ``cu_seqlens`` is
    read on the host for the key); never modify them in place."""
    if position_ids is not None:
        if position_ids.shape[-1] != seq_len:
            raise ValueError(f"position_ids must cover the full sequence ({seq_len}), got "
                             f"{tuple(position_ids.shape)}")
        return position_ids
    device = torch.device(device)
    if cu_seqlens is not None:
        if cu_seqlens.is_cuda:  # reading it for a key would sync
            return position_ids_from_cu_seqlens(cu_seqlens, seq_len, device)
        return _table(("positions", seq_len, str(device), tuple(cu_seqlens.tolist())),
                      lambda: position_ids_from_cu_seqlens(cu_seqlens, seq_len, device))
    return _table(("positions", seq_len, str(device)), lambda: torch.arange(seq_len, device=device))


@functools.cache
def _rope_kernels():
    """The Triton RoPE kernels' module, or None where triton (or nsa_dist, in a to-hf export)
    is missing."""
    try:  # absolute: this module is also bundled into to-hf exports
        from nsa_dist.kernels import rope
    except ImportError:
        return None
    return rope


def _kernels_for(x: torch.Tensor):
    """The RoPE kernels where they take x (CUDA, 16/32-bit, last dim contiguous), else None."""
    return _rope_kernels() if x.is_cuda and x.dtype != torch.float64 and x.stride(-1) == 1 else None


def _angles(cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    """cos/sin [1 or B, S, 1, D] (halves repeated) -> the kernels' fp32 [1 or B, S, D/2]. Shared
    tables (``cos_sin``) give shared angles: two conversions fewer per call."""
    half = cos.shape[-1] // 2
    key = next((k for k, v in _TABLES.items() if isinstance(v, tuple) and v[0] is cos and v[1] is sin), None)

    def build():
        return cos[:, :, 0, :half].float().contiguous(), sin[:, :, 0, :half].float().contiguous()
    return build() if key is None else _table(("angles",) + key, build)


def check_chunks(who: str, chunks: Optional[list], widths: list, kinds: list, head_dim: int, seq_len: int) -> list:
    """``split_columns``' / ``rope_split``'s ``chunks`` (None: all 1) as a list, refused with
    what is allowed: per group 1, or c > 1 dividing seq_len for a "copy" / "rope" group of
    whole heads of head_dim."""
    chunks = list(chunks or [1] * len(widths))
    if len(chunks) != len(widths) or any(c != 1 and (c < 1 or k == "silu" or w % head_dim or seq_len % c)
                                         for c, w, k in zip(chunks, widths, kinds)):
        raise ValueError(f"{who}: chunks {chunks} must give each group 1 or a c > 1 dividing the {seq_len} "
                         f"positions, for \"copy\" / \"rope\" groups of whole heads of {head_dim} (widths "
                         f"{list(widths)}, kinds {list(kinds)})")
    return chunks


class RotaryEmbedding(torch.nn.Module):
    """Rotate-half RoPE (Llama convention) on the last dimension of [B, S, heads, D]."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"RoPE dimension must be even, got {dim}")
        # Frequencies are recomputed per call (dim/2 numbers) rather than kept as a buffer,
        # so meta-device construction and foreign loaders never leave them uninitialised.
        self.dim, self.theta = dim, theta

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions: [S] or [B, S] -> cos, sin broadcastable to [B, S, 1, D]. For the shared
        positions of ``token_positions`` the tables are shared too (read-only)."""
        # keyed by what the positions are (their own key), never by a reusable id
        source = next((k for k, v in _TABLES.items() if v is positions), None)
        if source is None:
            return self._cos_sin(positions, dtype)
        return _table(("cos_sin", source, dtype, self.dim, self.theta), lambda: self._cos_sin(positions, dtype))

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float64, device=positions.device) / self.dim
        inv_freq = (1.0 / self.theta ** exponent).to(torch.float32)
        freqs = positions.to(torch.float32)[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        if emb.dim() == 2:
            emb = emb[None]
        return emb.cos()[:, :, None, :].to(dtype), emb.sin()[:, :, None, :].to(dtype)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, S, heads, D] by cos/sin from ``cos_sin`` (not named apply: that is
        nn.Module.apply, which DeepSpeed calls on every submodule). On CUDA (16/32-bit x,
        last dim contiguous) one Triton kernel per direction (kernels/rope.py); the PyTorch
        lines below are its reference and the path everywhere else."""
        half = x.shape[-1] // 2
        kernels = _kernels_for(x)
        if kernels is not None:
            return kernels.rope_rotate(x, *_angles(cos, sin))
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    @staticmethod
    def rotate_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sizes: list) -> list:
        """``rotate(x, cos, sin).split(sizes, dim=2)``: x [B, S, H, D] -> [B, S, h_i, D] per
        group of ``sizes`` heads. On CUDA each group is written to its own contiguous tensor
        (the kernels then read it without a copy) and the backward fills one gradient of x."""
        kernels = _kernels_for(x)
        if kernels is not None:
            return list(kernels.rope_rotate_split(x, *_angles(cos, sin), sizes))
        return list(RotaryEmbedding.rotate(x, cos, sin).split(sizes, dim=2))

    @staticmethod
    def split_columns(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, widths: list, kinds: list,
                      bias: Optional[torch.Tensor] = None, chunks: Optional[list] = None) -> list:
        """y [B, S, N] (a fused projection's output) -> [B, S, w_i] per group of ``widths``
        (sum N) columns, by ``kinds[i]``: "copy", "rope" (heads of cos' last dim D, rotated) or
        "silu" (one group: silu(y + bias), a gate's first layer). On CUDA one Triton kernel
        writes every group to its own contiguous tensor (nothing downstream copies them) and
        its backward fills y's gradient whole (no concatenation); elsewhere the PyTorch ops
        (copied groups are views of y). chunks: per group 1, or c > 1 for a "copy" / "rope"
        group of whole heads returned as [B, S / c, heads, c, D] (contiguous: phi's chunks,
        which the kernel writes in that order, so no transposing copy of them follows)."""
        kernels = _kernels_for(y)
        D = cos.shape[-1]
        chunks = check_chunks("split_columns", chunks, widths, kinds, D, y.shape[1])
        if kernels is not None:
            if bias is None or bias.dtype == y.dtype:
                return list(kernels.rope_split(y, *_angles(cos, sin), widths, kinds, D, bias, chunks))
            # a bias of another dtype (mixed precision) promotes: the group copied, then PyTorch's ops
            parts = kernels.rope_split(y, *_angles(cos, sin), widths, ["copy" if k == "silu" else k for k in kinds], D,
                                       chunks=chunks)
        else:
            parts = [RotaryEmbedding.rotate(p.unflatten(-1, (-1, D)), cos, sin).flatten(2) if k == "rope" else p
                     for p, k in zip(y.split(widths, dim=-1), kinds)]
            parts = [p if c == 1 else p.unflatten(1, (-1, c)).unflatten(-1, (-1, D)).transpose(2, 3).contiguous()
                     for p, c in zip(parts, chunks)]
        return [torch.nn.functional.silu(p + bias) if k == "silu" else p for p, k in zip(parts, kinds)]

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        cos, sin = self.cos_sin(positions, x.dtype)
        return self.rotate(x, cos, sin)

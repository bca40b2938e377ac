"""TMA tensor descriptors for the kernels' tile loads (Hopper; docs/kernel_notes.md, "TMA loads").

A host-side descriptor (``triton.tools.tensor_descriptor.TensorDescriptor``) names a tensor's
shape, strides and one box; ``desc.load([row, col])`` in a kernel is one bulk copy of that box
into shared memory. Boxes past the tensor's end read zeros; rows past a tile's range inside
the tensor are read, so the kernels mask them as they mask the pointer loads' keys.

A key or query tile is one box, or one box per head-dim piece where Dk runs in equal pieces
(192 = 3 x 64: the box is one piece wide, loaded at three column offsets). Each helper returns
None (per tensor, or for all) where a tile is not whole boxes: the kernels then take their
pointer loads. ``geo`` is the call's ``nsa.Geometry``.
"""
from __future__ import annotations

import torch


def tma_ok(x: torch.Tensor) -> bool:
    """Can TMA read x: contiguous, 16-byte aligned, and 16-bit on a GPU (the TMA paths were
    measured and GPU-tested with bf16; fp32 inputs keep the pointer loads there, while the CPU
    interpreter runs the TMA code in fp32 for the tests)."""
    return x.is_contiguous() and x.data_ptr() % 16 == 0 and (x.element_size() == 2 or not x.is_cuda)


def _tma_dims(geo, with_v: bool = True) -> bool:
    """Dk one power-of-two tile or equal power-of-two pieces (192 = 3 x 64), unpadded, and (with_v)
    Dv unpadded: each piece of a tile is then one box of one descriptor (``headdim.rest_tma``)."""
    bd, bd2, bd3 = geo.dk_split()
    return (bd2 in (0, bd) and bd3 in (0, bd) and bd * (1 + (bd2 > 0) + (bd3 > 0)) == geo.DK
            and (not with_v or geo.bdv() == geo.DV))


def kv_descriptors(k, v, geo, keys: int):
    """Descriptors of k [T, H, Dk] and v [T, H, Dv] (v may be None) as [T, H * D] tensors, a box
    of ``keys`` keys x one Dk piece (k) or Dv (v): one key tile of one KV head
    (``launch.sel_tma``, ``range_tma``, ``select_tma``). (None, None) where a tile is not whole
    boxes (Dk padded or in unequal pieces, Dv padded) or the rows are not 16-byte aligned, as
    TMA needs."""
    if not _tma_dims(geo, with_v=v is not None) or keys > 256:  # the selection loads no V
        return None, None
    from triton.tools.tensor_descriptor import TensorDescriptor

    out = []
    for x, width in ((k, geo.dk_split()[0]), (v, geo.DV)):
        if x is None:
            out.append(None)
            continue
        T, H, D = x.shape[-3:]
        if not tma_ok(x) or (H * D * x.element_size()) % 16 or D > 256:
            return None, None
        out.append(TensorDescriptor.from_tensor(x.reshape(-1, H * D), [keys, width]))
    return tuple(out)


def row_descriptors(q, do, geo, rows: int):
    """Descriptors of q [Tq, HQ, Dk] and do [Tq, HQ, Dv] whose box is one step of the range
    dK/dV: rows // G positions x the G heads of one KV head x one Dk piece (q) or Dv (do)
    (``launch.dkdv_tma``). (None, None) where G or a step's positions are no power of two, a
    step is not whole positions, the head dims are not whole boxes, or the rows are not 16-byte
    aligned."""
    G = geo.G
    if (G & (G - 1)) or rows % G or ((rows // G) & (rows // G - 1)) or not _tma_dims(geo):
        return None, None
    from triton.tools.tensor_descriptor import TensorDescriptor

    out = []
    for x, width in ((q, geo.dk_split()[0]), (do, geo.DV)):
        D = x.shape[-1]
        if not tma_ok(x) or (D * x.element_size()) % 16 or D > 256:
            return None, None
        out.append(TensorDescriptor.from_tensor(x.reshape(-1, geo.HQ, D), [rows // G, G, width]))
    return tuple(out)

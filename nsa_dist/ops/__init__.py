"""The NSA function (SPEC.md): public entry points; kernels plug in behind them."""
from .api import BACKENDS, kernels_take_query_offsets, nsa_attention, resolve_backend, select_blocks
from .blocks import compressed_cu_seqlens, num_compressed, num_sel_blocks, overlap_weights
from .compress import compress

__all__ = [
    "BACKENDS", "compress", "kernels_take_query_offsets", "compressed_cu_seqlens", "nsa_attention", "num_compressed",
    "num_sel_blocks", "overlap_weights", "resolve_backend", "select_blocks",
]

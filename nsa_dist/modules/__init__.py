"""Neural-network layers: NSA attention, its dense baseline and their parts."""
from .attention import AttentionStats, NSAAttention, SelectionMemo, tokens_read
from .comm import AttentionComm, LMComm, Region
from .compression import MLPCompressor
from .dense import DenseAttention
from .gate import GateMLP
from .rope import RotaryEmbedding, position_ids_from_cu_seqlens

__all__ = ["AttentionComm", "AttentionStats", "DenseAttention", "LMComm", "Region", "GateMLP", "MLPCompressor", "SelectionMemo",
           "NSAAttention", "RotaryEmbedding", "position_ids_from_cu_seqlens", "tokens_read"]

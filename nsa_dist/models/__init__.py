"""Models built from nsa_dist layers."""
from .decoder import DecoderBlock, LMOutput, NSADecoderLM, SwiGLU
from .flops import (attended_keys_per_query, attention_flops_per_token, selection_flops_per_token,
                    training_flops_per_token)

__all__ = ["DecoderBlock", "LMOutput", "NSADecoderLM", "SwiGLU", "attended_keys_per_query",
           "attention_flops_per_token", "selection_flops_per_token", "training_flops_per_token"]

"""Checkpoint conversion: consolidated format, Hugging Face import and export."""
from .io import load_consolidated, save_consolidated

__all__ = ["load_consolidated", "save_consolidated"]

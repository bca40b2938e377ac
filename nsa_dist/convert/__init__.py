"""Checkpoint conversion: consolidated format, Hugging Face import and export."""
from .io import atomic_output_dir, load_consolidated, save_consolidated

__all__ = ["atomic_output_dir", "load_consolidated", "save_consolidated"]

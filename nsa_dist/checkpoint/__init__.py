"""Checkpoints on disk, below both ``training`` (writes and resumes them) and ``convert``
(consolidates and reshards them): neither of those imports the other.

- ``files``: the folder, its file names, the ``latest`` marker, the metadata and its checks;
- ``tensors``: weights-only loads, safetensors, the Adam-moments file;
- ``layout``: the layout record (which slice of which full parameter a rank holds, in the
  optimizer's order) and renaming a checkpoint's names to the live model's;
- ``full``: the layout-free format (write, load, cut for this rank).
"""
from .files import (FORMAT_VERSION, LATEST_FILE, META_FILE, OPTIMIZER, WEIGHTS, find_tag_dir, read_meta,
                    tag_for_step, verify_checkpoint)
from .full import load_full, load_weights
from .layout import local_layout

__all__ = ["FORMAT_VERSION", "LATEST_FILE", "META_FILE", "OPTIMIZER", "WEIGHTS", "find_tag_dir", "load_full",
           "load_weights", "local_layout", "read_meta", "tag_for_step", "verify_checkpoint"]

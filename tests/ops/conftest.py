"""Kernel tests run through Triton's CPU interpreter: it must be on before triton is imported."""
import os

try:  # a CUDA machine runs the compiled kernels (and the GPU tests); a CPU one interprets them
    import torch
    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

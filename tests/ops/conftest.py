"""Kernel tests: on a machine without CUDA they run through Triton's CPU interpreter, which
must be switched on before triton is imported; on a CUDA machine the kernels are compiled."""
import os

try:
    import torch
    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # from a source checkout that is not pip-installed, kernels/ is registered on first load
    from nsa_dist.ops.api import load_kernels
    load_kernels()
except RuntimeError:  # triton missing: the kernel tests skip themselves
    pass

"""Shared test set-up: the tests folder is importable (naive oracle, input factories); on a
machine without CUDA, Triton's CPU interpreter is on before anything imports triton (torch's
compile machinery does, so a later switch comes too late for triton.language itself), for
the kernel tests of tests/ops and the context-parallel runs on the Triton backend."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

try:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass


def _numpy_xor_sum_in_the_interpreter():
    """Triton's interpreter runs a reduction with a custom combine function element by element
    in Python. tl.sort / tl.topk / tl.bitonic_merge compare-and-swap through xor sums, so the
    selection kernel spent seconds per program in them. Reduce xor sums with NumPy instead
    (the same integers); Triton versions without these internals keep the slow path."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
        ops, xor = interpreter.ReduceOps, tl.standard._xor_combine
        slow = ops.apply_impl
    except (ImportError, AttributeError):  # pragma: no cover - other Triton versions
        return

    def apply_impl(self, input):
        if self.combine_fn is xor:
            x = input[0]
            data = np.bitwise_xor.reduce(x.handle.data, axis=self.axis, keepdims=self.keep_dims)
            return self.to_tensor(data, x.dtype)
        return slow(self, input)
    ops.apply_impl = apply_impl


if os.environ.get("TRITON_INTERPRET") == "1":
    _numpy_xor_sum_in_the_interpreter()

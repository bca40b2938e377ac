"""A probe kernel for the range kernels' interior bounds (test_kernels_interp.py): the
interpreter runs a kernel from its module's globals, so it lives in a module of its own."""
import triton
import triton.language as tl

from nsa_dist.kernels.range_attn import _interior, _interior_queries


@triton.jit
def probe(ARGS, OUT, KIND: tl.constexpr, L: tl.constexpr, DS: tl.constexpr, W: tl.constexpr, LS: tl.constexpr):
    """Per program i: ARGS[7i:7i+7] = (t0, t1, ds0, a0, a1, q_lo, q_hi), the key tile's keys
    local to ds0 -> OUT[4i:4i+4] = ``_interior`` of the query tile, ``_interior_queries`` of the
    key tile (int64)."""
    i = tl.program_id(0)
    t0, t1, ds0 = tl.load(ARGS + 7 * i), tl.load(ARGS + 7 * i + 1), tl.load(ARGS + 7 * i + 2)
    a0, a1 = tl.load(ARGS + 7 * i + 3), tl.load(ARGS + 7 * i + 4)
    q_lo, q_hi = tl.load(ARGS + 7 * i + 5), tl.load(ARGS + 7 * i + 6)
    f_lo, f_hi = _interior(t0, t1, ds0, KIND, L, DS, W, LS)
    g_lo, g_hi = _interior_queries(a0 + ds0, a1 + ds0, ds0, ds0, q_lo, q_hi, KIND, L, DS, W, LS)
    tl.store(OUT + 4 * i, f_lo)
    tl.store(OUT + 4 * i + 1, f_hi)
    tl.store(OUT + 4 * i + 2, g_lo)
    tl.store(OUT + 4 * i + 3, g_hi)

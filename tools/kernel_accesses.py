"""Global memory accesses of every Triton kernel one NSA layer launches, as built for a GPU, on
any machine (a CPU is enough): does each kernel move its wide tensors with vector accesses?

    python tools/kernel_accesses.py [--heads 8:2] [--dims 128:128] [--seq 256] [--arch 90]

One forward + backward of an ``NSAAttention`` layer on its CUDA code path (every Triton kernel
it launches) runs through Triton's interpreter in a child process, which records every
distinct launch: argument types, and which arguments a real launch would specialise as
divisible by 16 (16-byte aligned tensors, integers that are multiples of 16). Each launch is
then compiled here for ``--arch`` and its PTX counted: global loads and stores, and how many of
them are 2- or 4-wide vector accesses, plus cp.async copies. A kernel whose wide tensors move
with scalar accesses only (the split kernel once: docs/kernel_notes.md) stands out. Counts are
of instructions in the code, not of traffic; which is faster is the GPU's to say.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def capture(hq: int, h: int, dk: int, dv: int, seq: int) -> list:
    """[module, kernel, {arg: [type, divisible by 16]}, constexprs] of every distinct launch of
    one layer forward + backward (run under TRITON_INTERPRET=1, fp16)."""
    import torch
    import triton.runtime.interpreter as interp
    from kernel_spills import _arg_spec, _arg_type

    from nsa_dist.config import NSAConfig
    from nsa_dist.modules import compression, rope
    from nsa_dist.modules.attention import NSAAttention

    seen = {}
    real = interp.InterpretedFunction.__getitem__

    def spy(self, grid):
        run = real(self, grid)

        def record(*args, **kw):
            code = self.fn.__code__
            # [type, specialization] as kernel_spills records them: TMA descriptors, None for an
            # unused optional argument, ints equal to 1 as constants, divisibility by 16
            args_of = {name: [_arg_type(a), _arg_spec(a)]
                       for name, a in zip(code.co_varnames[:code.co_argcount], args)}
            key = (self.fn.__module__, self.fn.__name__, json.dumps(kw, sort_keys=True, default=str))
            seen.setdefault(key, [self.fn.__module__, self.fn.__name__, args_of, kw])
            return run(*args, **kw)
        return record

    interp.InterpretedFunction.__getitem__ = spy
    rope._kernels_for = lambda x: rope._rope_kernels()  # the CUDA path's kernels on CPU tensors
    compression._phi_kernels_for = lambda k: compression._phi_kernels()
    torch.manual_seed(0)
    cfg = NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, num_selected=4, window=64)
    layer = NSAAttention(256, hq, h, dk, v_head_dim=dv, config=cfg, backend="triton").to(torch.float16)
    x = torch.randn(1, seq, 256, dtype=torch.float16, requires_grad=True)
    y = layer(x)
    (y[0] if isinstance(y, tuple) else y).float().sum().backward()
    return list(seen.values())


def accesses(rec: list, arch: int) -> dict:
    """Global loads / stores (and their vector share) and cp.async copies of one launch's PTX."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernel_spills import compile_options

    module, name, args_of, kw = rec
    fn = getattr(importlib.import_module(module), name)
    options, kw = compile_options(kw)
    kw.update({n: 1 for n, (ty, sp) in args_of.items() if sp == "1" and n not in kw})
    kw.update({n: None for n, (ty, sp) in args_of.items() if ty == "none" and n not in kw})
    sig = {n: "constexpr" if n in kw else args_of[n][0] for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n not in kw and args_of[n][1] == "D"}
    const = {(fn.arg_names.index(n),): v for n, v in kw.items()}
    ptx = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                         options=options).asm["ptx"]
    count = lambda pattern: len(re.findall(pattern, ptx))  # noqa: E731
    return dict(loads=count(r"ld\.global"), vector_loads=count(r"ld\.global[.\w]*\.v[24]"),
                stores=count(r"st\.global"), vector_stores=count(r"st\.global[.\w]*\.v[24]"),
                cp_async=count(r"cp\.async\.c"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default="8:2", help="query:KV heads of the layer")
    ap.add_argument("--dims", default="128:128", help="Dk:Dv")
    ap.add_argument("--seq", type=int, default=256, help="positions (a multiple of 16, as real lengths are)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability, 90 = Hopper")
    ap.add_argument("--capture", default="", help=argparse.SUPPRESS)  # child: write the launches here
    a = ap.parse_args(argv)
    hq, h = (int(t) for t in a.heads.split(":"))
    dk, dv = (int(t) for t in a.dims.split(":"))
    if a.capture:
        with open(a.capture, "w") as fh:
            json.dump(capture(hq, h, dk, dv, a.seq), fh)
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run kernel_accesses.py without TRITON_INTERPRET=1: it compiles for a GPU itself")
    from kernel_spills import captured

    recs = captured(__file__, ["--heads", a.heads, "--dims", a.dims, "--seq", str(a.seq)])
    print(f"{'kernel':22s} {'loads':>6s} {'vector':>7s} {'stores':>7s} {'vector':>7s} {'cp.async':>9s}")
    for rec in recs:
        try:
            n = accesses(rec, a.arch)
            print(f"{rec[1]:22s} {n['loads']:6d} {n['vector_loads']:7d} {n['stores']:7d} {n['vector_stores']:7d} "
                  f"{n['cp_async']:9d}")
        except Exception as err:  # noqa: BLE001 - one kernel's failure is a row, not the end
            print(f"{rec[1]:22s} failed: {type(err).__name__}: {str(err).splitlines()[0][:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

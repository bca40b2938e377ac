"""Registers and spills of the NSA kernels as Triton builds them for a GPU, on any machine
(issue 25: launch settings per shape without spending device time).

Usage (from the repository root; a CPU is enough):
    python tools/kernel_spills.py --group 4 --dims 192:128 --settings "" --settings acc_regs=None \
        [--compile-triton FOLDER]   # e.g. pip install --no-deps --target FOLDER triton==3.6.0

For each ``--settings`` (LaunchConfig settings as --ab takes them, NAME=VALUE,...; "" for the
defaults) one small forward + backward runs through Triton's interpreter (a child process with
TRITON_INTERPRET=1) and records every kernel launch: argument types, constexprs, warps and
stages. Each launch kind is then compiled for ``--arch`` (90: Hopper, sm_90a) by the installed
Triton (with the launcher's specialization: addresses and ints divisible by 16, ints equal to
1), and ptxas -v reports its registers and spill stores / loads: bytes of spill
instructions in the code (static, not traffic), a sign of register pressure, not a time. The
group size G = HQ / H and the head dims set the constexprs; the capture uses enough KV heads
that HQ is a multiple of 16, as the launcher sees in real models. Which setting is faster is
the GPU's to say (bench_kernels.py --sweep / --ab).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# kernels whose launches are recorded: module -> names (nsa.py imports them by name)
KERNELS = {
    "range_attn": ("_range_fwd", "_range_bwd_dq", "_range_bwd_dkdv"),
    "selected_attn": ("_sel_fwd", "_sel_bwd_dq", "_sel_fwd_split", "_sel_bwd_dq_split", "_sel_bwd_dkdv",
                      "_sel_combine", "_sel_dq_combine"),
    "selection": ("_select_topn",),
    "gates": ("_combine_fwd", "_combine_bwd"),
}
S_TOKENS = 192  # the smallest length with every key kind of the paper's l' = 64 (block 0 past the local ones)


def _arg_type(x) -> str:
    """Triton signature type of one launch argument."""
    import torch

    if isinstance(x, torch.Tensor):
        return "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
                      torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8"}[x.dtype]
    if isinstance(x, bool):
        return "i1"
    if isinstance(x, int):
        return "i64" if abs(x) >= 2 ** 31 else "i32"
    if isinstance(x, float):
        return "fp32"
    if x is None:  # an unused optional argument (e.g. no TMA descriptor): a constexpr None
        return "none"
    if type(x).__name__ == "TensorDescriptor":  # a host-side TMA descriptor
        return f"tensordesc<{_arg_type(x.base)[1:]}[{','.join(str(b) for b in x.block_shape)}]>"
    raise TypeError(f"launch argument of type {type(x).__name__}")


def _arg_spec(x) -> str:
    """How Triton's launcher specializes an argument, as a real launch on the GPU would: "D"
    (divisible by 16: a tensor's address, an int's value; the loads and stores built on it can
    be vectorized, and only then pipelined), "1" (an int equal to 1: a constant), or ""."""
    import torch

    if isinstance(x, torch.Tensor):
        return "D" if x.data_ptr() % 16 == 0 else ""
    if isinstance(x, int) and not isinstance(x, bool):
        return "1" if x == 1 else "D" if x % 16 == 0 else ""
    return ""


def capture(group: int, dk: int, dv: int, dtype: str, settings: str) -> list[dict]:
    """Every distinct kernel launch of one forward + backward (run under TRITON_INTERPRET=1):
    [{module, kernel, types, constexprs (num_warps / num_stages included)}]."""
    import torch

    from bench_kernels import launch_config, parse_settings

    from nsa_dist import NSAConfig, ops
    from nsa_dist.kernels import nsa
    from nsa_dist.kernels.launch import use_launch

    seen = {}

    def spy(mod, name):
        real = getattr(mod, name)

        class Spy:
            def __getitem__(self, grid):
                def run(*args, **kw):
                    spec = [_arg_spec(a) for a in args]  # a new specialization is a new build
                    key = (name, json.dumps(kw, sort_keys=True), tuple(spec))
                    seen.setdefault(key, dict(module=mod.__name__, kernel=name, types=[_arg_type(a) for a in args],
                                              spec=spec, constexprs=kw))
                    return real[grid](*args, **kw)
                return run
        setattr(mod, name, Spy())
        if hasattr(nsa, name):
            setattr(nsa, name, getattr(mod, name))
    import importlib
    for module, names in KERNELS.items():
        mod = importlib.import_module(f"nsa_dist.kernels.{module}")
        for name in names:
            spy(mod, name)
    cfg = NSAConfig()
    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    r = lambda *s: torch.randn(*s, generator=gen).to(dt)  # noqa: E731
    S = S_TOKENS
    # KV heads so that the query heads (HQ = H * G) are a multiple of 16, as in real models:
    # HQ is a launch argument whose divisibility the launcher specializes on (a lone head
    # would make HQ = G, and HQ = 1 a constant)
    H = max(1, 16 // group) if 16 % group == 0 else 16
    k, v = r(1, S, H, dk), r(1, S, H, dv)
    x = dict(q=r(1, S, H * group, dk), k_cmp=ops.compress(k, cfg), v_cmp=ops.compress(v, cfg),
             k_sel=r(1, S, H, dk), v_sel=r(1, S, H, dv), k_win=r(1, S, H, dk), v_win=r(1, S, H, dv),
             gates=torch.rand(1, S, H * group, 3, generator=gen).to(dt))
    x = {n: t.requires_grad_(True) for n, t in x.items()}
    with use_launch(launch_config(parse_settings(settings)) if settings else launch_config({})):
        o = ops.nsa_attention(*x.values(), cfg, backend="triton")
        o.backward(torch.randn_like(o))
    return list(seen.values())


def captured(script: str, args: list) -> list:
    """The launches ``script --capture FILE *args`` records in a child process under
    TRITON_INTERPRET=1 (kernels imported under the interpreter cannot be compiled here)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        child = subprocess.run([sys.executable, os.path.abspath(script), "--capture", path, *args], env=env,
                               capture_output=True, text=True)
        if child.returncode:  # the interpreter's run failed: show why
            raise SystemExit(f"capture under TRITON_INTERPRET=1 failed:\n{child.stderr[-3000:]}")
        with open(path) as fh:
            return json.load(fh)


def compile_options(constexprs: dict) -> tuple[dict, dict]:
    """A recorded launch's keywords -> (Triton compile options: num_warps, num_stages and a
    register cap ``maxnreg`` where set, the kernel's constexprs)."""
    kw = dict(constexprs)
    options = dict(num_warps=kw.pop("num_warps", 4), num_stages=kw.pop("num_stages", 3))
    if "maxnreg" in kw:  # a register cap (LaunchConfig.<kernel>_regs)
        options["maxnreg"] = kw.pop("maxnreg")
    return options, kw


def compile_usage(rec: dict, arch: int, dump: str = "") -> dict:
    """Registers, spill bytes (stores, loads) and shared memory of one recorded launch; ``dump``:
    a file stem to write its Triton GPU IR (.ttgir: the layouts each tile takes) and PTX to."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(rec["module"]), rec["kernel"])
    options, kw = compile_options(rec["constexprs"])
    # the launcher's specialization (``_arg_spec``): constants equal to 1, divisibility by 16
    args = [n for n in fn.arg_names if n not in kw]
    spec = rec.get("spec") or [""] * len(args)
    kw.update({n: 1 for n, sp in zip(args, spec) if sp == "1"})
    kw.update({n: None for n, ty in zip(args, rec["types"]) if ty == "none"})
    types = dict(zip(args, rec["types"]))
    sig = {n: "constexpr" if n in kw else types[n] for n in fn.arg_names}
    const = {(fn.arg_names.index(n),): val for n, val in kw.items()}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, sp in zip(args, spec) if sp == "D"}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                            options=options)
    if dump:
        for ext in ("ttgir", "ptx"):
            with open(f"{dump}.{ext}", "w") as fh:
                fh.write(kernel.asm[ext])
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as fh:
            fh.write(kernel.asm["ptx"])
        out = subprocess.run([get_ptxas(arch).path, f"--gpu-name=sm_{arch}a", "-v", ptx, "-o", os.devnull],
                             capture_output=True, text=True)
    log = out.stdout + out.stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    if not spills or not regs:
        raise RuntimeError(f"ptxas said: {log[-300:]}")
    return dict(regs=int(regs[1]), spill_stores=int(spills[1]), spill_loads=int(spills[2]),
                smem=kernel.metadata.shared, **options)


def _label(rec: dict) -> str:
    kw = rec["constexprs"]
    extra = " ".join(f"{k}={kw[k]}" for k in ("MODE", "ATOMIC", "BLOCK_M", "BLOCK_N", "BT") if k in kw)
    if kw.get("BDK2"):  # Dk in pieces (kernels/headdim.py)
        extra += f" Dk={kw['BDK']}+{kw['BDK2']}" + (f"+{kw['BDK3']}" if kw.get("BDK3") else "")
    return f"{rec['kernel']} {extra}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head (G)")
    ap.add_argument("--dims", default="192:128", help="Dk:Dv")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--settings", action="append", default=None,
                    help='LaunchConfig settings NAME=VALUE,... (repeatable; "" the defaults)')
    ap.add_argument("--arch", type=int, default=90, help="compute capability, 90 = Hopper")
    ap.add_argument("--compile-triton", default="", help="folder holding another Triton (pip install --target) "
                    "to compile with, e.g. the GPU machine's version; the capture keeps the installed one, whose "
                    "interpreter runs the kernels (3.6's does not)")
    ap.add_argument("--dump", default="", help="folder to write each build's Triton GPU IR and PTX to")
    ap.add_argument("--capture", default="", help=argparse.SUPPRESS)  # child: write the launches here
    a = ap.parse_args(argv)
    if a.compile_triton:  # before anything imports triton
        if not os.path.isdir(os.path.join(a.compile_triton, "triton")):
            raise SystemExit(f"--compile-triton: no triton package in {a.compile_triton}")
        sys.path.insert(0, a.compile_triton)
    dk, dv = (int(t) for t in a.dims.split(":"))
    settings = a.settings if a.settings is not None else [""]
    if a.capture:
        recs = capture(a.group, dk, dv, a.dtype, settings[0])
        with open(a.capture, "w") as fh:
            json.dump(recs, fh)
        return
    from bench_kernels import launch_config, parse_settings

    for s in settings:  # a bad setting ends the tool before the slow part
        if s:
            launch_config(parse_settings(s))
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run kernel_spills.py without TRITON_INTERPRET=1: it compiles for a GPU itself")
    import triton

    print(f"G={a.group} Dk={dk} Dv={dv} {a.dtype}, sm_{a.arch}a, Triton {triton.__version__}; spill bytes are "
          f"static (code), not traffic")
    if a.dump:
        os.makedirs(a.dump, exist_ok=True)
    failed = []
    for i, s in enumerate(settings):
        recs = captured(__file__, ["--group", str(a.group), "--dims", a.dims, "--dtype", a.dtype, "--settings", s])
        print(f"\nsettings: {s or 'defaults'}")
        for j, rec in enumerate(recs):
            try:
                stem = os.path.join(a.dump, f"s{i}_{j:02d}{rec['kernel']}") if a.dump else ""
                u = compile_usage(rec, a.arch, stem)
                print(f"  {_label(rec):58s} warps {u['num_warps']} stages {u['num_stages']}: {u['regs']:3d} registers, "
                      f"spills {u['spill_stores']:5d} / {u['spill_loads']:5d} B, shared {u['smem']:6d} B", flush=True)
            except Exception as err:  # noqa: BLE001 - report and go on with the other kernels
                print(f"  {_label(rec):58s} failed: {type(err).__name__}: {str(err)[-700:]}", flush=True)
                failed.append(rec["kernel"])
    if failed:  # a kernel the interpreter runs but Triton cannot build for the GPU
        raise SystemExit(f"{len(failed)} build(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

"""What ``tools/bench_kernels.py --bench`` compares our NSA kernels with (issue 25).

- Dense causal attention: SDPA limited to its cuDNN backend, SDPA limited to its flash
  backend, and flash-attn's ``flash_attn_func`` (FA2 ``flash_attn``, FA3
  ``flash_attn_interface``) when importable.
- FLA's ``parallel_nsa`` (fla-core) when importable: G = HQ / H a power of two >= 16.
- Scalable-Flash-Native-Sparse-Attention's ``HFNSACore`` (the "peer"; Triton, TMA) from its
  source: a package ``flash_nsa`` on ``sys.path``. Nothing of either is vendored here: the
  GPU script puts a git-ignored copy on ``PYTHONPATH`` (docs/benchmarks.md says how).

Each function returns a ``Timed`` (what the bench times) or raises ``Unavailable`` with the
reason, which the bench writes into the row instead of a figure. Inputs are ours: q
[1, S, HQ, Dk], k [1, S, H, Dk], v [1, S, H, Dv], do [1, S, HQ, Dv]; layout changes that a
backend needs are made here, outside the timed calls.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass, field
from typing import Callable

import torch


class Unavailable(Exception):
    """A comparison that cannot run here: missing package, unsupported shape, out of memory."""


@dataclass
class Timed:
    """One implementation, ready to time: ``fwd()`` (the bench calls it under no_grad),
    ``step()`` (forward + backward), ``grads`` (leaves whose .grad the bench clears before
    each step), ``note`` (how it ran: variant, branches)."""
    fwd: Callable[[], object]
    step: Callable[[], None]
    grads: list = field(default_factory=list)
    note: str = ""


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """A leaf sharing ``t``'s storage (nothing writes the inputs in place), so that the large
    shapes do not hold a second copy of every input."""
    return t.detach().requires_grad_(True)


def _first_that_runs(variants):
    """The Timed of the first of ``variants`` (name, builder) whose step runs, its note the
    name. An error other than out-of-memory means the implementation refuses that layout or
    shape: the next one is tried; with none left, Unavailable names every reason."""
    reasons = []
    for name, build in variants:
        try:
            timed = build()
            timed.step()  # also the warm-up
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            timed.note = name
            return timed
        except torch.cuda.OutOfMemoryError:
            raise Unavailable(f"out of memory ({name})") from None
        except Exception as err:  # noqa: BLE001 - a layout or shape this implementation refuses
            reasons.append(f"{name}: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}")
    raise Unavailable("; ".join(reasons))


def sdpa_dense(backend: str, q, k, v, do) -> Timed:
    """Causal SDPA limited to ``backend`` ("cudnn" or "flash"). Tried in order: the KV heads
    grouped by SDPA (``enable_gqa``), then expanded to the query heads (outside the timed call:
    the strongest dense figure), then with V zero-padded to Dk where Dk != Dv (the output sliced
    back in the timed call). ``note`` names the layout that ran."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    only = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    G = q.shape[2] // k.shape[2]
    Dk, Dv = q.shape[3], v.shape[3]
    dod = do.transpose(1, 2)

    def build(expand: bool, pad: bool):
        def make():
            qd = _leaf(q.transpose(1, 2))
            kk, vv = k, v
            if pad:
                vv = torch.nn.functional.pad(vv, (0, Dk - Dv))
            kd, vd = (_leaf(t.transpose(1, 2).repeat_interleave(G, dim=1) if expand else t.transpose(1, 2))
                      for t in (kk, vv))

            def fwd():
                with sdpa_kernel([only]):
                    o = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True,
                                                                         enable_gqa=not expand and G > 1)
                return o[..., :Dv] if pad else o
            return Timed(fwd, lambda: fwd().backward(dod), [qd, kd, vd])
        return make
    variants = [("enable_gqa", build(False, False)), ("K/V expanded", build(True, False))]
    if Dk != Dv:
        variants += [("V padded to Dk", build(False, True)), ("K/V expanded, V padded", build(True, True))]
    return _first_that_runs(variants)


def flash_attn_dense(q, k, v, do) -> Timed:
    """flash-attn's ``flash_attn_func`` (FA3's ``flash_attn_interface`` first, then FA2's
    ``flash_attn``), causal, GQA native."""
    fns = []
    for mod in ("flash_attn_interface", "flash_attn"):
        try:
            fns.append((mod, importlib.import_module(mod).flash_attn_func))
        except (ImportError, AttributeError) as err:
            missing = f"{mod} not importable ({type(err).__name__})"
    if not fns:
        raise Unavailable(missing)

    def build(fn):
        def make():
            qf, kf, vf = _leaf(q), _leaf(k), _leaf(v)

            def fwd():
                o = fn(qf, kf, vf, causal=True)
                return o[0] if isinstance(o, tuple) else o  # some FA3 versions return (o, lse)
            return Timed(fwd, lambda: fwd().backward(do), [qf, kf, vf])
        return make
    return _first_that_runs([(mod, build(fn)) for mod, fn in fns])


def fla_nsa(q, k, v, gates, cfg) -> Timed:
    """FLA's ``parallel_nsa`` with one K/V (mean-pooled compression inside, block = stride =
    l'), its gates from ours (cmp, sel), no window (FLA's needs flash-attn)."""
    G = q.shape[2] // k.shape[2]
    if G < 16 or G & (G - 1):
        raise Unavailable(f"FLA needs HQ / H a power of two >= 16, got {G}")
    try:
        from fla.ops.nsa import parallel_nsa
    except Exception as err:  # noqa: BLE001 - any import failure means: not here
        raise Unavailable(f"fla-core not importable ({type(err).__name__}: {err})") from None
    qf, kf, vf = _leaf(q), _leaf(k), _leaf(v)
    gc, gs = _leaf(gates[..., 0].contiguous()), _leaf(gates[..., 1].contiguous())
    do = torch.randn(*q.shape[:3], v.shape[3], device=q.device, dtype=q.dtype)

    def fwd():
        return parallel_nsa(qf, kf, vf, gc, gs, None, block_counts=cfg.num_selected, block_size=cfg.sel_block,
                            window_size=0)
    return _first_that_runs([("compression, selection", lambda: Timed(fwd, lambda: fwd().backward(do),
                                                                       [qf, kf, vf, gc, gs]))])


# ----------------------------------------------------------------------------- the peer
_STANDINS = {
    # module: attributes. The peer imports pandas for its own timing printout (HFNSACore's
    # bench=True) and pkg_resources for one version comparison; neither is on every machine.
    "pandas": {},
    "pkg_resources": {"parse_version": lambda s: tuple(int(p) for p in s.split("+")[0].split(".")[:3]
                                                      if p.isdigit())},
}


def _bare_package(name: str, path: list) -> None:
    """Register package ``name`` (folder ``path``) without running its ``__init__``."""
    pkg = types.ModuleType(name)
    pkg.__path__ = path
    sys.modules[name] = pkg


def load_peer():
    """The peer's ``flash_nsa.modules.hf_level_nsa`` module, imported from ``flash_nsa`` on
    sys.path without the package's ``__init__`` files (they import the Megatron-level layers,
    inference and numpy, none of which HFNSACore needs). Missing pandas / pkg_resources get
    stand-ins during the import only. Raises Unavailable with the reason."""
    name = "flash_nsa.modules.hf_level_nsa"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("flash_nsa")
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("flash_nsa (Scalable-Flash-Native-Sparse-Attention) is not on PYTHONPATH")
    if not torch.cuda.is_available():
        raise Unavailable("the peer needs a CUDA device (it reads the device capability on import)")
    root = list(spec.submodule_search_locations)
    _bare_package("flash_nsa", root)
    _bare_package("flash_nsa.modules", [p + "/modules" for p in root])
    added = []
    for mod, attrs in _STANDINS.items():
        if importlib.util.find_spec(mod) is None:
            sys.modules[mod] = types.SimpleNamespace(**attrs, __name__=mod)
            added.append(mod)
    try:
        return importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - report why, go on with the other comparisons
        for m in [m for m in sys.modules if m == "flash_nsa" or m.startswith("flash_nsa.")]:
            del sys.modules[m]
        raise Unavailable(f"the peer does not import: {type(err).__name__}: {err}") from None
    finally:
        for mod in added:  # only the peer's modules keep their reference
            sys.modules.pop(mod, None)


def peer_has_window() -> bool:
    """Can the peer run its window branch here (it calls flash-attn for it)?"""
    try:
        load_peer()
    except Unavailable:
        return False
    swa = sys.modules["flash_nsa.ops.sliding_window_attention"]
    return bool(swa.HAVE_FA2 or swa.HAVE_FA3)


@contextlib.contextmanager
def _peer_without_window(hf, zeros: torch.Tensor):
    """HFNSACore.forward with its window call returning zeros (the branch off, as ours at w = 0)."""
    real = hf.swa_varlen_func
    hf.swa_varlen_func = lambda *a, **kw: zeros
    try:
        yield
    finally:
        hf.swa_varlen_func = real


def peer_nsa(q, k, v, gates, do, cfg, window: bool) -> Timed:
    """The peer's ``HFNSACore`` (mean compression of one shared K/V, kernel l, stride d,
    blocks l', top n with block 0 and two local blocks forced, as ours), one document.
    ``window``: run its window branch (w = cfg.window; needs flash-attn, ``peer_has_window``);
    without it the branch returns zeros and the gated sum covers compression and selection."""
    hf = load_peer()
    S, HQ, H, Dk, Dv = q.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3]
    hf.NSAHelper.x_cu_seqlens = None  # its hyper-parameters are class state: re-derive the lengths
    conf = hf.NSAConfig(head_dim=Dk, qk_head_dim=Dk, v_head_dim=Dv, num_heads=HQ, num_kv_heads=H,
                        kernel_size=cfg.cmp_block, stride=cfg.cmp_stride, block_size=cfg.sel_block,
                        top_n=cfg.num_selected, num_init_blocks=1, num_local_blocks=2,
                        window_size=cfg.window if window else 0)
    core = hf.HFNSACore(conf)
    qp, kp, vp = (_leaf(t[0]) for t in (q, k, v))
    wp = _leaf(gates[0])
    dop = do[0]
    cu = torch.tensor([0, S], dtype=torch.int32, device=q.device)
    zeros = torch.zeros(S, HQ, Dv, device=q.device, dtype=q.dtype)

    def fwd():
        with contextlib.nullcontext() if window else _peer_without_window(hf, zeros):
            return core(qp, kp, vp, wp, cu)
    branches = "compression, selection" + (", window" if window else "")
    return _first_that_runs([(branches, lambda: Timed(fwd, lambda: fwd().backward(dop), [qp, kp, vp, wp]))])

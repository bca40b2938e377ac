"""One call per layer: ``ops.nsa_attention(..., return_indices=True)`` selects inside (the
kernels from the compressed branch's own forward) and returns (o, indices), equal to
select_blocks + nsa_attention(block_indices=...) and to the reference, gradients too; the
benchmark times the layer's call; select_blocks defaults to the kernels on CUDA.

Kernel cases run through Triton's interpreter on the CPU (fp32, fp16; small shapes)."""
import inspect
import os
import sys

import pytest
import torch

from nsa_dist import NSAConfig, ops
from nsa_inputs import args, random_nsa_inputs

from _interp import kernels_or_skip, max_rel

NAMES = ("q", "k_cmp", "v_cmp", "k_sel", "v_sel", "k_win", "v_win", "gates")
CASES = {
    # name: (cfg kwargs, B, S, HQ, H, Dk, Dv, cu_seqlens)
    "G2-batch2": (dict(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=3, window=24), 2, 64, 4, 2, 16, 16, None),
    "G3-Dv32": (dict(cmp_block=16, cmp_stride=8, sel_block=16, num_selected=3, window=8), 1, 70, 3, 1, 16, 32, None),
    "G2-packed": (dict(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=4, window=16), 1, 100, 4, 2, 16, 16,
                  [0, 37, 40, 100]),
}


def _inputs(case, dtype=torch.float32, seed=1, device="cpu"):
    kw, B, S, HQ, H, Dk, Dv, cu = CASES[case]
    cfg = NSAConfig(**kw)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    x = random_nsa_inputs(cfg, B=B, S=S, HQ=HQ, H=H, Dk=Dk, Dv=Dv, dtype=dtype, seed=seed, cu_seqlens=cu_t,
                          requires_grad=True, device=device)
    return cfg, None if cu_t is None else cu_t.to(device), x


def _grads(o, x, do):
    return dict(zip(NAMES, torch.autograd.grad(o, args(x), do)))


# batch 2 with `-m slow`: the one call at B = 2 also runs by default in test_kernels_interp.py
# (test_forward_selection_and_grads_match_reference[block-G2-batch2], the kernels selecting)
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "G2-batch2" else c
                                  for c in sorted(CASES)])
def test_one_call_equals_select_then_attend_and_the_reference(case):
    _, device = kernels_or_skip()
    cfg, cu, x = _inputs(case, device=device)
    B, S, HQ = x["q"].shape[:3]
    H = x["k_sel"].shape[2]
    o, idx = ops.nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="triton", return_indices=True)
    assert idx.dtype == torch.long and idx.shape == (B, S, H, cfg.num_selected)
    sel = ops.select_blocks(x["q"].detach(), x["k_cmp"].detach(), cfg, cu_seqlens=cu, backend="triton")
    o_two = ops.nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="triton", block_indices=sel,
                              canonical_indices=True)
    o_ref, idx_ref = ops.nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="reference", return_indices=True)
    assert torch.equal(idx, sel) and torch.equal(idx, idx_ref)
    assert torch.equal(idx_ref, ops.select_blocks(x["q"].detach(), x["k_cmp"].detach(), cfg, cu_seqlens=cu,
                                                  backend="reference"))
    assert max_rel(o, o_two) < 1e-6 and max_rel(o, o_ref) < 1e-5
    do = torch.randn_like(o_ref)
    g, g_two, g_ref = _grads(o, x, do), _grads(o_two, x, do), _grads(o_ref, x, do)
    for name in NAMES:
        assert float(g_ref[name].abs().max()) > 0, name
        assert max_rel(g[name], g_two[name]) < 1e-6, name
        assert max_rel(g[name], g_ref[name]) < 1e-4, f"d{name}: {max_rel(g[name], g_ref[name]):.2e}"


def test_one_call_in_fp16_equals_select_then_attend():
    """fp16 (the interpreter mis-reads bf16): the kernels' own selection, the same as
    select_blocks's on the same inputs; o and gradients close to the fp32 reference given it."""
    _, device = kernels_or_skip()
    cfg, cu, x = _inputs("G2-packed", dtype=torch.float16, device=device)
    o, idx = ops.nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="triton", return_indices=True)
    assert o.dtype == torch.float16
    sel = ops.select_blocks(x["q"].detach(), x["k_cmp"].detach(), cfg, cu_seqlens=cu, backend="triton")
    assert torch.equal(idx, sel)
    o_two = ops.nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="triton", block_indices=sel,
                              canonical_indices=True)
    x32 = {k: v.detach().float().requires_grad_(True) for k, v in x.items()}
    o_ref = ops.nsa_attention(*args(x32), cfg, cu_seqlens=cu, backend="reference", block_indices=idx)
    assert max_rel(o, o_two) < 1e-6 and max_rel(o, o_ref) < 5e-3
    do = torch.randn_like(o_ref)
    g, g_two, g_ref = _grads(o, x, do.half()), _grads(o_two, x, do.half()), _grads(o_ref, x32, do)
    for name in NAMES:
        assert max_rel(g[name], g_two[name]) < 1e-6, name
        assert max_rel(g[name], g_ref[name]) < 1e-2, f"d{name}: {max_rel(g[name], g_ref[name]):.2e}"


def _odd_blocks_only(imp):
    """A reduction that changes the choice: only odd blocks keep their importance."""
    keep = torch.arange(imp.shape[-1], device=imp.device) % 2 == 1
    return torch.where(keep, imp, torch.zeros_like(imp))


@pytest.mark.parametrize("cu", [pytest.param(None, marks=pytest.mark.slow), [0, 50, 128]],
                         ids=["one-sequence", "packed"])
def test_reduce_importance_falls_back_to_select_then_attend(cu):
    """reduce_importance (parallel layouts) cannot enter the fused kernels: the call selects
    with it (the reference importance), then attends; indices and output as the reference's.
    l' = 8, n = 5 over up to 16 blocks: the importance decides two blocks per position."""
    _, device = kernels_or_skip()
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=5, window=16)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    x = random_nsa_inputs(cfg, B=1, S=128, HQ=4, H=2, Dk=16, seed=4, cu_seqlens=cu, requires_grad=True,
                          device=device)
    cu = None if cu is None else cu.to(device)
    o, idx = ops.nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="triton", return_indices=True,
                               reduce_importance=_odd_blocks_only)
    o_ref, idx_ref = ops.nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="reference", return_indices=True,
                                       reduce_importance=_odd_blocks_only)
    plain = ops.select_blocks(x["q"].detach(), x["k_cmp"].detach(), cfg, cu_seqlens=cu, backend="reference")
    assert torch.equal(idx, idx_ref) and not torch.equal(idx, plain)  # the reduction decided
    assert max_rel(o, o_ref) < 1e-5
    do = torch.randn_like(o_ref)
    g, g_ref = _grads(o, x, do), _grads(o_ref, x, do)
    for name in NAMES:
        assert max_rel(g[name], g_ref[name]) < 1e-4, name


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_given_indices_come_back_as_given(backend):
    device = kernels_or_skip()[1] if backend == "triton" else "cpu"
    cfg, cu, x = _inputs("G2-packed", device=device)
    sel = ops.select_blocks(x["q"].detach(), x["k_cmp"].detach(), cfg, cu_seqlens=cu, backend="reference")
    o, idx = ops.nsa_attention(*args(x), cfg, cu_seqlens=cu, backend=backend, block_indices=sel,
                               canonical_indices=True, return_indices=True)
    assert idx is sel
    assert torch.equal(o, ops.nsa_attention(*args(x), cfg, cu_seqlens=cu, backend=backend, block_indices=sel,
                                            canonical_indices=True))


def test_signature_the_model_layer_builds_against():
    params = list(inspect.signature(ops.nsa_attention).parameters.items())
    assert [(n, p.default) for n, p in params[9:]] == [
        ("scale", None), ("cu_seqlens", None), ("backend", "auto"), ("block_indices", None),
        ("reduce_importance", None), ("canonical_indices", False), ("return_indices", False), ("q_start", 0),
        ("forward_memo", None)]
    assert [n for n, _ in params[:9]] == list(NAMES) + ["config"]


def test_select_blocks_defaults_to_the_kernels_on_cuda(monkeypatch):
    """Called as the README shows (no backend), select_blocks takes the kernels on CUDA, as
    nsa_attention does; here CUDA is faked on the CPU and the kernels are a recorder."""
    from nsa_dist.ops import api

    real_resolve = api.resolve_backend
    seen = []

    class FakeKernels:
        @staticmethod
        def select_blocks(q, k_cmp, cfg, scale, cu_seqlens, q_start=0, seq_len=None):
            seen.append("kernels")
            return torch.zeros(*q.shape[:2], k_cmp.shape[2], cfg.num_selected, dtype=torch.long)

    monkeypatch.setattr(api, "resolve_backend", lambda b, device, dtype: real_resolve(b, torch.device("cuda"), dtype))
    monkeypatch.setattr(api, "load_kernels", lambda: FakeKernels)
    cfg, _, x = _inputs("G2-batch2")
    ops.select_blocks(x["q"].detach(), x["k_cmp"].detach(), cfg)
    assert seen == ["kernels"]
    ops.select_blocks(x["q"].detach(), x["k_cmp"].detach(), cfg, backend="reference")
    assert seen == ["kernels"]  # an explicit reference stays the reference
    ops.select_blocks(x["q"].detach(), x["k_cmp"].detach(), cfg, reduce_importance=lambda imp: imp)
    assert seen == ["kernels"]  # the kernels cannot apply a reduction: the reference does


def _op_calls(monkeypatch):
    """Record every public-op call (name and the arguments that choose its path)."""
    calls = []
    for name in ("select_blocks", "nsa_attention"):
        real = getattr(ops, name)
        sig = inspect.signature(real)

        def spy(*a, _real=real, _sig=sig, _name=name, **kw):
            bound = _sig.bind(*a, **kw)
            bound.apply_defaults()
            path = {k: (v is not None) if k in ("block_indices", "reduce_importance", "cu_seqlens", "scale")
                    else v for k, v in bound.arguments.items()
                    if not isinstance(v, torch.Tensor) and k != "config"}
            calls.append((_name, path))
            return _real(*a, **kw)
        monkeypatch.setattr(ops, name, spy)
    return calls


def test_the_benchmark_times_the_layers_call(monkeypatch):
    """tools/bench_kernels.py times ``layer_call``; the attention layer must make the same op
    calls with the same path choices (one nsa_attention that selects and returns indices)."""
    from nsa_dist.modules import NSAAttention

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    import bench_kernels

    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=3, window=16)
    layer = NSAAttention(32, 4, 2, 16, config=cfg)
    x = torch.randn(1, 48, 32)
    p = layer.project(x, torch.arange(48))
    calls = _op_calls(monkeypatch)
    o_layer, idx_layer = layer.attend(p)
    layer_calls = list(calls)
    calls.clear()
    o_bench, idx_bench = bench_kernels.layer_call(p, cfg)
    assert layer_calls and layer_calls == calls, (layer_calls, calls)
    assert torch.equal(idx_layer, idx_bench) and torch.equal(o_layer, o_bench)


def test_the_selection_runs_inside_a_profiler_range():
    """The selection's kernels are launched from plain Python; a named range around them
    gives them an op in a torch.profiler trace (else the step profile counted them as GPU
    idle: about 50 ms of the 1b model's 32k step on the H100, 2026-12-06)."""
    from torch.profiler import ProfilerActivity, profile

    from nsa_dist.kernels.api import SELECT_RANGE

    _, device = kernels_or_skip()
    cfg, cu, x = _inputs("G2-batch2", device=device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ops.nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="triton", return_indices=True)
        ops.select_blocks(x["q"].detach(), x["k_cmp"].detach(), cfg, cu_seqlens=cu, backend="triton")
    assert sum(e.name == SELECT_RANGE for e in prof.events()) == 2

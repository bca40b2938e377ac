"""The NSA layer's small PyTorch ops around the kernels (the step profile's "attention other"):
the CUDA path's projection split (RoPE) and phi kernels equal the PyTorch lines, and the
ops one layer's forward + backward launches stay counted (interpreter on the CPU, fp32)."""
import collections
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from nsa_dist.config import NSAConfig
from nsa_dist.modules import NSAAttention
from nsa_dist.modules import compression, rope

from _interp import kernels_or_skip

CFG = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=4, window=16, phi="mlp")
# ops that launch no kernel on CUDA (views, allocations, metadata)
FREE = {"view", "_unsafe_view", "reshape", "unflatten", "split", "split_with_sizes", "slice", "select", "transpose",
        "t", "permute", "expand", "unsqueeze", "squeeze", "detach", "alias", "as_strided", "unfold", "narrow",
        "_reshape_alias", "unbind", "flatten", "empty", "empty_like", "empty_strided", "new_empty",
        "new_empty_strided", "_local_scalar_dense", "set_", "_pin_memory", "is_pinned", "lift_fresh",
        "result_type", "promote_types", "sym_size", "sym_stride", "sym_numel", "squeeze_", "unsqueeze_",
        "scalar_tensor"}
COPIES = {"copy_", "_to_copy", "clone", "contiguous", "cat", "stack", "slice_backward", "select_backward"}


def _caller() -> str:
    """"triton" inside a kernel run by the interpreter (its argument copies: not counted),
    "tiles" inside the work list's construction (torch.compile'd on CUDA: a few fused
    kernels), else "layer"."""
    f = sys._getframe(2)
    while f is not None:
        if "triton/runtime" in f.f_code.co_filename.replace("\\", "/"):
            return "triton"
        if f.f_code.co_name == "_device_lists":
            return "tiles"
        f = f.f_back
    return "layer"


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.tiles = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        where = "free" if name in FREE else _caller()
        if where in ("layer", "tiles"):
            (self.ops if where == "layer" else self.tiles)[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def cuda_path(monkeypatch):
    """The layer's CUDA path on the CPU: the split/RoPE and phi kernels (interpreter)."""
    kernels_or_skip()
    monkeypatch.setattr(rope, "_kernels_for", lambda x: rope._rope_kernels())
    monkeypatch.setattr(compression, "_phi_kernels_for", lambda k: compression._phi_kernels())


def _layer(backend: str, fused: bool = True) -> NSAAttention:
    torch.manual_seed(0)
    layer = NSAAttention(64, 4, 2, 16, config=CFG, backend=backend, fused_projection=fused)
    with torch.no_grad():  # trained-looking: nothing zero, phi away from the mean
        for p in layer.parameters():
            p.normal_(0.0, 0.1)
    return layer


def _grads(layer, x):
    x = x.clone().requires_grad_(True)
    y, _ = layer(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    params = [x, *layer.parameters()]
    return y.detach(), torch.autograd.grad(y, params, gy)


def test_kernel_path_equals_the_pytorch_lines(cuda_path):
    """Fused projection through the split kernel (q and keys rotated, every piece contiguous)
    and phi's tails through their kernels: the unfused PyTorch layer's output and every
    gradient (fp32, 1e-5)."""
    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(2))
    layer = _layer("reference")
    y, g = _grads(layer, x)
    p = layer.project(x, torch.arange(40))
    assert all(t.is_contiguous() for k, t in p.items() if k != "gates"), "a piece the kernels would copy"
    with pytest.MonkeyPatch.context() as mp:  # the PyTorch lines
        mp.setattr(rope, "_kernels_for", lambda x: None)
        mp.setattr(compression, "_phi_kernels_for", lambda k: None)
        layer.fused_projection = False
        y_ref, g_ref = _grads(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert b.abs().max() > 0


def _count_step(layer, x):
    """Ops of one layer as ``recompute: keep_attention`` runs it: (forward, backward) _Count;
    the backward's include the projections' recomputation."""
    x = x.clone().requires_grad_(True)
    fwd, bwd = _Count(), _Count()
    with fwd:
        p = checkpoint(layer.prepare, x, use_reentrant=False)
        o, _ = layer.attend(p)
        y = checkpoint(layer.finish, o, use_reentrant=False)
    with bwd:
        y.backward(torch.ones_like(y))
    return fwd, bwd


def test_one_layer_launches_few_small_ops(cuda_path):
    """One layer's forward + backward on the CUDA path (the NSA function's kernels, the split
    and phi kernels) launches at most these PyTorch ops (those that launch a kernel on CUDA):
    in all, and copies / concatenations (each a pass over a layer-sized tensor) in particular.
    A change that adds one fails here; lower the bounds when a change removes some. (Before
    the split and phi kernels: 39 forward, 89 backward, 34 copies; each GEMM counts one.)"""
    layer = _layer("triton")
    # 48 positions: 6 selection blocks for n = 4 (the importance decides); the counts are those of 64
    x = torch.randn(1, 48, 64, generator=torch.Generator().manual_seed(3))
    _count_step(layer, x)  # the packing's tables are built once per shape
    layer.zero_grad(set_to_none=True)  # no accumulation into earlier gradients
    fwd, bwd = _count_step(layer, x)
    copies = {n: c for n, c in (fwd.ops + bwd.ops).items() if n in COPIES}
    # the weight concatenation (forward, recomputation), the indices' int32 copy, two small
    # gradient copies; phi's chunks come from the split kernel in phi's order (before: a clone
    # of k and of v in the forward, the recomputation and their gradients, 11 copies)
    assert sum(copies.values()) <= 5, copies
    assert "clone" not in copies, "phi's chunks copied: the split kernel should write them in phi's order"
    assert (fwd.ops + bwd.ops)["cat"] <= 2, "one weight concatenation per forward (and its recomputation)"
    assert sum(fwd.ops.values()) <= 15, dict(fwd.ops)
    assert sum(bwd.ops.values()) <= 45, dict(bwd.ops)
    assert sum(fwd.tiles.values()) <= 86 and not bwd.tiles, (dict(fwd.tiles), dict(bwd.tiles))


@pytest.mark.parametrize("bias_dtype,copy_width", [(torch.float16, 16), (torch.float32, 16), (torch.float16, 7)])
def test_split_columns_kernel_equals_pytorch(bias_dtype, copy_width, cuda_path):
    """RotaryEmbedding.split_columns through the kernel (fp16 under the interpreter): the
    pieces and the gradients of y and the bias as the PyTorch lines give them, a bias of
    another dtype (mixed precision) promoting the gate's group as PyTorch's add does. A copied
    group of 7 columns puts the next group off every 16-byte boundary (no wide accesses)."""
    torch.manual_seed(0)
    B, S, D = 2, 11, 16
    widths, kinds = [3 * D, D, copy_width, 24], ["rope", "rope", "copy", "silu"]
    y = torch.randn(B, S, sum(widths), dtype=torch.float16, requires_grad=True)
    bias = torch.randn(24, dtype=bias_dtype, requires_grad=True)
    cos, sin = rope.RotaryEmbedding(D).cos_sin(torch.arange(S), torch.float16)
    got = rope.RotaryEmbedding.split_columns(y, cos, sin, widths, kinds, bias)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rope, "_kernels_for", lambda x: None)
        want = rope.RotaryEmbedding.split_columns(y, cos, sin, widths, kinds, bias)
    assert got[-1].dtype == want[-1].dtype == torch.promote_types(torch.float16, bias_dtype)
    gys = [torch.randn(w.shape, dtype=w.dtype) for w in want]
    for a, b in zip(torch.autograd.grad(got, [y, bias], gys), torch.autograd.grad(want, [y, bias], gys)):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_split_columns_writes_phis_chunks(cuda_path):
    """``chunks``: a rotated and a copied group returned as [B, S / c, heads, c, D] hold what the
    plain groups hold, each head's c positions together (the kernel, fp32 under the
    interpreter, and the PyTorch lines), and their gradients reach y as the plain groups' do."""
    torch.manual_seed(0)
    B, S, D, c = 2, 12, 16, 4
    widths, kinds = [2 * D, 2 * D, 2 * D, 8], ["rope", "rope", "copy", "silu"]
    y = torch.randn(B, S, sum(widths), requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    cos, sin = rope.RotaryEmbedding(D).cos_sin(torch.arange(S), torch.float32)
    as_chunks = lambda p: p.unflatten(1, (S // c, c)).unflatten(-1, (-1, D)).transpose(2, 3)
    for kernel in (True, False):
        plain = rope.RotaryEmbedding.split_columns(y, cos, sin, widths, kinds, bias)
        with pytest.MonkeyPatch.context() as mp:
            if not kernel:
                mp.setattr(rope, "_kernels_for", lambda x: None)
            got = rope.RotaryEmbedding.split_columns(y, cos, sin, widths, kinds, bias, [1, c, c, 1])
        assert got[1].shape == got[2].shape == (B, S // c, 2, c, D) and got[1].is_contiguous()
        want = [plain[0], as_chunks(plain[1]), as_chunks(plain[2]), plain[3]]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        gys = [torch.randn(w.shape, generator=torch.Generator().manual_seed(i)) for i, w in enumerate(want)]
        for a, b in zip(torch.autograd.grad(got, [y, bias], gys), torch.autograd.grad(want, [y, bias], gys)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunks,why", [([1, 5, 1, 1], "dividing the 12 positions"),
                                        ([1, 1, 1, 4], "groups of whole heads"), ([4], "must give each group")])
def test_split_columns_refuses_bad_chunks(chunks, why):
    y = torch.randn(1, 12, 56)
    cos, sin = rope.RotaryEmbedding(16).cos_sin(torch.arange(12), torch.float32)
    with pytest.raises(ValueError, match=why):
        rope.RotaryEmbedding.split_columns(y, cos, sin, [16, 16, 16, 8], ["rope", "rope", "copy", "silu"],
                                           torch.zeros(8), chunks)


def test_phi_chunks_only_where_nothing_else_reads_the_keys():
    """The fused projection writes the compressed branch's K/V as phi's chunks only for one
    unpacked sequence of whole chunks with its own K/V, an MLP phi and K/V the plan leaves
    in place; the layer's values are the same either way (test_kernel_path_equals_the_pytorch_lines)."""
    layer = _layer("reference")
    assert layer._cmp_chunk(40, None) == CFG.cmp_stride
    assert layer._cmp_chunk(42, None) == 1  # a partial chunk
    assert layer._cmp_chunk(40, torch.tensor([0, 20, 40])) == 1  # packed documents
    layer.fused_projection = False
    assert layer._cmp_chunk(40, None) == 1
    shared = NSAAttention(64, 4, 2, 16, config=NSAConfig(**{**CFG.to_dict(), "shared_kv": True}))
    assert shared._cmp_chunk(40, None) == 1
    mean = NSAAttention(64, 4, 2, 16, config=NSAConfig(**{**CFG.to_dict(), "phi": "mean"}))
    assert mean._cmp_chunk(40, None) == 1
    moved = _layer("reference")
    moved.comm.kv_local = lambda: False  # a plan's all-to-all / gather of K/V
    assert moved._cmp_chunk(40, None) == 1


_WIDE_ACCESS_CHECK = r'''
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nsa_dist.kernels.rope import _split_cols
types = dict(Y="*bf16", TABLE="*i64", COS="*fp32", SIN="*fp32", BIAS="*bf16", PRE="*bf16", DPRE="*bf16",
             R="i32", S="i32", sy="i32", cos_b="i32")
for backward in (False, True):
    const = dict(SIGN=1.0, BACKWARD=backward, HALF=64, BLOCK_R=32, BLOCK_D=64, ALIGN=16, PTR_ALIGNED=True, PRECISE=True)
    names = _split_cols.arg_names
    sig = {n: "constexpr" if n in const else types[n] for n in names}
    # a real launch's specialisation: 16-byte aligned pointers, sizes and strides divisible by 16
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in types}
    k = triton.compile(ASTSource(_split_cols, sig, constexprs={(names.index(n),): v for n, v in const.items()},
                                 attrs=attrs), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    ptx = k.asm["ptx"]
    print(backward, len(re.findall(r"st[.]global", ptx)), len(re.findall(r"st[.]global[.][.a-z0-9]*v4", ptx)))
'''


def test_split_kernel_moves_16_bytes_per_access_when_built_for_hopper():
    """The split kernel built for sm_90 as a launch at the 1b's shapes specialises it: every
    global store is a 16-byte vector store. Its table-driven offsets once hid the alignment
    and it moved 2 bytes per access (2 ms a call at 32k on the H100, 2026-12-06)."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real build, not the interpreter
    env["PYTHONPATH"] = root
    run = subprocess.run([sys.executable, "-c", _WIDE_ACCESS_CHECK], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split() for line in run.stdout.splitlines()]
    assert [r[0] for r in rows] == ["False", "True"], run.stdout
    for _, stores, wide in rows:
        assert int(stores) > 0 and int(wide) == int(stores), run.stdout

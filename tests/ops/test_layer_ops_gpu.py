"""On CUDA in bf16, the NSA layer's split and phi kernels give the PyTorch lines' values bit for
bit, forward and backward (the CPU tests check fp32 under the interpreter, which has neither
bf16 nor CUDA's exp). Skipped without CUDA."""
import os

import pytest
import torch

from nsa_dist.modules import compression
from nsa_dist.modules.compression import MLPCompressor
from nsa_dist.modules.rope import RotaryEmbedding

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="needs CUDA (and the compiled, not interpreted, kernels)")]


def _grads(out, inputs, gy):
    return [out.detach(), *torch.autograd.grad(out, inputs, gy)]


@pytest.mark.parametrize("block,stride", [(32, 16), (32, 8), (16, 16)])
def test_phi_kernels_are_the_pytorch_lines_bit_for_bit(block, stride, monkeypatch):
    """The 1b shape's phi (l = 32, d = 16, D = 128), trained-looking weights: the output and
    every gradient (k, fc1, pos, fc2) equal with and without the tail kernels."""
    torch.manual_seed(0)
    phi = MLPCompressor(block, 128, stride=stride).cuda().bfloat16()
    with torch.no_grad():
        for p in phi.parameters():
            p.normal_(0.0, 0.05)
    k = torch.randn(2, 2048 + 7, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    inputs = [k, *phi.parameters()]
    out = phi.sequence(k)
    gy = torch.randn_like(out)
    got = _grads(out, inputs, gy)
    monkeypatch.setattr(compression, "_phi_kernels_for", lambda k: None)
    want = _grads(phi.sequence(k), inputs, gy)
    for name, a, b in zip(["out", "k", *(n for n, _ in phi.named_parameters())], got, want):
        assert torch.equal(a, b), f"{name}: max diff {(a.float() - b.float()).abs().max()}"


def test_split_kernel_is_rope_split_and_silu_bit_for_bit():
    """A fused projection's output split into q, three keys (rotated), three values and the
    gate's first layer (+ bias, SiLU): each piece and the gradients of y and the bias equal
    the RoPE kernel over the views and PyTorch's add and SiLU."""
    from nsa_dist.kernels import rope as rope_kernel

    torch.manual_seed(0)
    B, S, D = 1, 1024, 128
    widths = [32 * D, 8 * D, 8 * D, 8 * D, 8 * D, 8 * D, 8 * D, 512]
    kinds = ["rope"] * 4 + ["copy"] * 3 + ["silu"]
    y = torch.randn(B, S, sum(widths), device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rope = RotaryEmbedding(D, 500000.0)
    cos, sin = rope.cos_sin(torch.arange(S, device="cuda"), torch.bfloat16)
    got = RotaryEmbedding.split_columns(y, cos, sin, widths, kinds, bias)
    assert all(p.is_contiguous() for p in got)
    angles = (cos[:, :, 0, :D // 2].float().contiguous(), sin[:, :, 0, :D // 2].float().contiguous())
    want = [rope_kernel.rope_rotate(p.unflatten(-1, (-1, D)), *angles).flatten(2) if k == "rope"
            else torch.nn.functional.silu(p + bias) if k == "silu" else p
            for p, k in zip(y.split(widths, dim=-1), kinds)]
    gys = [torch.randn_like(p) for p in got]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    g_got = torch.autograd.grad(got, [y, bias], gys)
    g_want = torch.autograd.grad(want, [y, bias], gys)
    for a, b in zip(g_got, g_want):
        assert torch.equal(a, b), f"max diff {(a.float() - b.float()).abs().max()}"


def test_split_kernel_writes_phis_chunks_bit_for_bit():
    """The 1b shape's compressed-branch K (rotated) and V (copied) written as phi's chunks
    [B, S / 16, 8, 16, 128]: the plain pieces rearranged, bit for bit; phi of the chunks and
    its gradients (y, the bias, phi's weights) as phi of the plain keys gives them (the same
    GEMM operands; the chunk sums reduce in another memory order: one bf16 rounding apart)."""
    torch.manual_seed(0)
    B, S, D, c = 1, 1024, 128, 16
    widths, kinds = [32 * D, 8 * D, 8 * D, 512], ["rope", "rope", "copy", "silu"]
    y = torch.randn(B, S, sum(widths), device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = RotaryEmbedding(D, 500000.0).cos_sin(torch.arange(S, device="cuda"), torch.bfloat16)
    phi = MLPCompressor(32, D, stride=c).cuda().bfloat16()
    with torch.no_grad():
        for p in phi.parameters():
            p.normal_(0.0, 0.05)
    plain = RotaryEmbedding.split_columns(y, cos, sin, widths, kinds, bias)
    got = RotaryEmbedding.split_columns(y, cos, sin, widths, kinds, bias, [1, c, c, 1])
    as_chunks = lambda p: p.unflatten(1, (S // c, c)).unflatten(-1, (-1, D)).transpose(2, 3)
    for a, b in zip(got, [plain[0], as_chunks(plain[1]), as_chunks(plain[2]), plain[3]]):
        assert a.shape == b.shape and torch.equal(a, b)
    outs_got = [got[0], phi(got[1], True), phi(got[2], True), got[3]]
    outs_want = [plain[0], phi.sequence(plain[1].unflatten(-1, (-1, D))),
                 phi.sequence(plain[2].unflatten(-1, (-1, D))), plain[3]]
    gys = [torch.randn_like(o) for o in outs_want]
    inputs = [y, bias, *phi.parameters()]
    for a, b in zip([*outs_got, *torch.autograd.grad(outs_got, inputs, gys)],
                    [*outs_want, *torch.autograd.grad(outs_want, inputs, gys)]):
        torch.testing.assert_close(a.float(), b.float(), rtol=8e-3, atol=1e-3 * b.float().abs().max().item())

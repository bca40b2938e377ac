"""The RoPE kernel against the PyTorch rotation (interpreter on the CPU, fp32 and fp16)."""
import pytest
import torch

from nsa_dist.modules.rope import RotaryEmbedding

rope_kernel = pytest.importorskip("nsa_dist.kernels.rope")
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, the interpreter elsewhere


def _angles(rope, positions):
    cos, sin = rope.cos_sin(positions, torch.float32)  # [1 or B, S, 1, D] (halves repeated)
    half = cos.shape[-1] // 2
    return cos[:, :, 0, :half].contiguous(), sin[:, :, 0, :half].contiguous()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("per_batch", [False, True])
def test_rope_kernel_matches_the_reference(dtype, tol, per_batch):
    torch.manual_seed(0)
    B, S, H, D = 2, 37, 5, 24
    rope = RotaryEmbedding(D, 500000.0)
    positions = torch.stack([torch.arange(S), torch.arange(S).flip(0)]) if per_batch else torch.arange(S)
    positions = positions.to(DEV)
    # a strided view, as the q heads of a fused projection output are
    full = torch.randn(B, S, H + 3, D, dtype=dtype, device=DEV, requires_grad=True)
    x = full[:, :, 1:H + 1]
    cos, sin = rope.cos_sin(positions, torch.float32)
    xf, half = x.float(), D // 2  # the PyTorch rotation (rotate() itself takes the kernel on CUDA)
    want = xf * cos + torch.cat([-xf[..., half:], xf[..., :half]], dim=-1) * sin
    got = rope_kernel.rope_rotate(x, *_angles(rope, positions))
    assert got.dtype == dtype and got.is_contiguous()
    assert (got.float() - want).abs().max() <= tol * want.abs().max()
    dy = torch.randn_like(want)
    (g_want,) = torch.autograd.grad(want, full, dy)
    (g_got,) = torch.autograd.grad(got.float(), full, dy.to(dtype).float())
    assert (g_got.float() - g_want).abs().max() <= tol * 4 * g_want.abs().max()


def test_rope_kernel_refuses_bad_angles():
    x = torch.randn(1, 8, 2, 16, device=DEV)
    good = torch.zeros(1, 8, 8, device=DEV)
    with pytest.raises(ValueError, match="cos/sin must be"):
        rope_kernel.rope_rotate(x, torch.zeros(1, 8, 16, device=DEV), torch.zeros(1, 8, 16, device=DEV))
    with pytest.raises(TypeError, match="float32"):
        rope_kernel.rope_rotate(x, good.half(), good.half())
    with pytest.raises(ValueError, match="D even"):
        rope_kernel.rope_rotate(torch.randn(1, 8, 2, 15, device=DEV), good, good)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_rope_split_gives_contiguous_groups_and_one_gradient(dtype, tol):
    """rope_rotate_split: the groups of rope_rotate's heads, each its own contiguous tensor
    (no copy left for the kernels); the gradient reaches x's strided view whole, groups
    without a gradient count as zero."""
    torch.manual_seed(0)
    B, S, D, sizes = 2, 19, 16, [4, 1, 2]
    rope = RotaryEmbedding(D, 10000.0)
    positions = torch.arange(S, device=DEV)
    full = torch.randn(B, S, sum(sizes) + 3, D, dtype=dtype, device=DEV, requires_grad=True)
    x = full[:, :, :sum(sizes)]  # the q and k heads of a fused projection
    angles = _angles(rope, positions)
    want = rope_kernel.rope_rotate(x, *angles).float().split(sizes, dim=2)
    got = rope_kernel.rope_rotate_split(x, *angles, sizes)
    assert len(got) == 3 and all(g.is_contiguous() and g.dtype == dtype for g in got)
    for g, w in zip(got, want):
        assert (g.float() - w).abs().max() <= tol * w.abs().max()
    dys = [torch.randn(g.shape, dtype=dtype, device=DEV) for g in got]
    (g_got,) = torch.autograd.grad([got[0], got[2]], full, [dys[0], dys[2]])  # group 1 unused
    dys[1].zero_()
    (g_want,) = torch.autograd.grad(torch.cat(rope_kernel.rope_rotate(x, *angles).float().split(sizes, dim=2), dim=2),
                                    full, torch.cat(dys, dim=2).float())
    assert (g_got.float() - g_want).abs().max() <= tol * 4 * g_want.abs().max()
    assert g_got[:, :, sum(sizes):].abs().max() == 0
    with pytest.raises(ValueError, match="must sum to"):
        rope_kernel.rope_rotate_split(x, *angles, [4, 1])
    # the module's path: the same groups through RotaryEmbedding.rotate_split (kernel on CUDA)
    cos, sin = rope.cos_sin(positions, dtype)
    for g, w in zip(RotaryEmbedding.rotate_split(x, cos, sin, sizes), RotaryEmbedding.rotate(x, cos, sin).split(sizes, 2)):
        torch.testing.assert_close(g, w)

"""RoPE positions and rotation tables are built once and shared by every layer of a step:
keyed by what they hold (length, device, document offsets, dtype), never by a tensor's id."""
import torch

from nsa_dist.modules.rope import RotaryEmbedding, token_positions


def test_layers_share_positions_and_tables():
    rope = RotaryEmbedding(16, 500.0)
    p = token_positions(12, "cpu")
    assert p is token_positions(12, "cpu") and torch.equal(p, torch.arange(12))
    cos, sin = rope.cos_sin(p, torch.float32)
    again = rope.cos_sin(token_positions(12, "cpu"), torch.float32)
    assert again[0] is cos and again[1] is sin
    # the same values as tables built from a private positions tensor
    fresh = rope.cos_sin(torch.arange(12), torch.float32)
    assert torch.equal(fresh[0], cos) and torch.equal(fresh[1], sin)
    assert rope.cos_sin(p, torch.float64)[0].dtype == torch.float64  # dtype is part of the key


def test_document_offsets_are_part_of_the_key():
    a = token_positions(10, "cpu", torch.tensor([0, 4, 10]))
    b = token_positions(10, "cpu", torch.tensor([0, 6, 10]))
    assert a.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5] and b.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    rope = RotaryEmbedding(8)
    assert not torch.equal(rope.cos_sin(a, torch.float32)[0], rope.cos_sin(b, torch.float32)[0])


def test_tables_survive_eviction_of_their_positions():
    """Many distinct lengths evict old entries; a table is never served for other positions."""
    rope = RotaryEmbedding(8)
    for n in range(5, 45):
        p = token_positions(n, "cpu", torch.tensor([0, n // 2, n]))
        cos, _ = rope.cos_sin(p, torch.float32)
        assert torch.equal(cos, rope.cos_sin(p.clone(), torch.float32)[0]), n


def test_inference_mode_tables_stay_out_of_training():
    with torch.inference_mode():
        inf = token_positions(7, "cpu")
    train = token_positions(7, "cpu")
    assert train is not inf and not train.is_inference()
    x = torch.randn(1, 7, 2, 8, requires_grad=True)
    rope = RotaryEmbedding(8)
    rope.rotate(x, *rope.cos_sin(train, x.dtype)).sum().backward()  # autograd may save them
    assert x.grad is not None

"""Host bookkeeping of the kernels (kernels/tiles.py) against brute force; no Triton needed."""
import pytest
import torch

pytest.importorskip("triton")
from nsa_dist.kernels import tiles  # noqa: E402


def _layout(cu, ccu):
    return tiles.make_layout(torch.tensor(cu), torch.tensor(ccu))


def test_query_tiles_stay_inside_documents():
    lay = _layout([0, 5, 5, 21], [0, 1, 1, 4])
    t = lay.query_tiles(4)
    assert t.tolist() == [[0, 4, 0, 5, 0], [4, 5, 0, 5, 0], [5, 9, 5, 21, 1], [9, 13, 5, 21, 1],
                          [13, 17, 5, 21, 1], [17, 21, 5, 21, 1]]
    c = lay.cmp_key_tiles(2)
    assert c.tolist() == [[0, 1, 0, 5, 0], [1, 3, 5, 21, 1], [3, 4, 5, 21, 1]]


def test_offsets_beyond_int32_are_kept_exact():
    big = 3 * 2 ** 31
    lay = tiles.Layout(torch.tensor([0, big]), torch.tensor([0, big // 16]),
                       torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    t = lay.query_tiles(2 ** 30)
    assert t.dtype == torch.int64 and int(t[-1, 1]) == big and int(t[-1, 0]) == big - 2 ** 30


def test_selection_union_is_sorted_unique_per_tile():
    gen = torch.Generator().manual_seed(0)
    T, H, n, span = 11, 2, 3, 4
    idx = torch.randint(-1, 6, (T, H, n), generator=gen)
    lay = _layout([0, T], [0, 2])
    qt = lay.query_tiles(span)
    union, cnt = tiles.selection_union(idx, qt, span)
    for i, (a0, a1) in enumerate(qt[:, :2].tolist()):
        for h in range(H):
            want = sorted({int(b) for b in idx[a0:a1, h].flatten() if b >= 0})
            assert union[i, h, :cnt[i, h]].tolist() == want
            assert (union[i, h, cnt[i, h]:] == -1).all()


def test_inverted_selection_lists_every_choice_once():
    gen = torch.Generator().manual_seed(1)
    cu = [0, 9, 20]
    T, H, n, ls, seg = 20, 2, 2, 4, 3
    idx = torch.randint(-1, 3, (T, H, n), generator=gen)
    lay = _layout(cu, [0, 1, 3])
    items, qlist = tiles.inverted_selection(idx, lay, ls, seg)
    seen = []
    for h, k0, k1, off, length in items.tolist():
        assert 0 < length <= seg and k1 - k0 <= ls
        for t in qlist[off:off + length].tolist():
            doc_start = 0 if t < 9 else 9
            b = (k0 - doc_start) // ls
            assert b in idx[t, h].tolist()
            seen.append((t, h, b))
    want = [(t, h, int(b)) for t in range(T) for h in range(H) for b in idx[t, h] if b >= 0]
    assert sorted(seen) == sorted(want)

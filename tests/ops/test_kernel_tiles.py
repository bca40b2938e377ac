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
    # (a0, a1, doc_start, doc_end, c_start) then the document's queries: every position, in
    # its own row (q_lo, q_hi, q_off) = (doc_start, doc_end, 0)
    assert t.tolist() == [[0, 4, 0, 5, 0, 0, 5, 0], [4, 5, 0, 5, 0, 0, 5, 0], [5, 9, 5, 21, 1, 5, 21, 0],
                          [9, 13, 5, 21, 1, 5, 21, 0], [13, 17, 5, 21, 1, 5, 21, 0], [17, 21, 5, 21, 1, 5, 21, 0]]
    assert torch.equal(lay.key_tiles(4), t)
    c = lay.cmp_key_tiles(2)
    assert c.tolist() == [[0, 1, 0, 5, 0, 0, 5, 0], [1, 3, 5, 21, 1, 5, 21, 0], [3, 4, 5, 21, 1, 5, 21, 0]]
    f = lay.first_block_tiles(2, 3)  # each document's first 3 positions (its selection block 0)
    assert f.tolist() == [[0, 2, 0, 5, 0, 0, 5, 0], [2, 3, 0, 5, 0, 0, 5, 0], [5, 7, 5, 21, 1, 5, 21, 0],
                          [7, 8, 5, 21, 1, 5, 21, 0]]


def test_query_chunk_tiles_cover_its_positions_with_row_offsets():
    """Queries [6, 19) of documents [0, 5), [5, 21): tiles over the queries only, keys tiles
    over all keys, each with its document's query range and q_off = 6 (row = position - 6);
    a batch of 2 sequences of 10 with queries [3, 7) of each: q_off 3 and 9."""
    lay = tiles.make_layout([0, 5, 21], [0, 1, 4], q_start=6, num_queries=13)
    assert lay.rows == 13 and lay.queries.tolist() == [[6, 6, 6], [6, 19, 6]]  # document 0: none
    assert lay.query_tiles(8).tolist() == [[6, 14, 5, 21, 1, 6, 19, 6], [14, 19, 5, 21, 1, 6, 19, 6]]
    assert lay.key_tiles(8).tolist() == [[0, 5, 0, 5, 0, 6, 6, 6], [5, 13, 5, 21, 1, 6, 19, 6],
                                         [13, 21, 5, 21, 1, 6, 19, 6]]
    assert lay.row_pos.tolist() == list(range(6, 19)) and lay.row_doc_start.tolist() == [5] * 13
    assert lay.tok_q_off.tolist() == [6] * 21
    two = tiles.make_layout([0, 10, 20], [0, 2, 4], q_start=3, num_queries=4, seq_len=10)
    assert two.queries.tolist() == [[3, 7, 3], [13, 17, 9]]
    assert two.row_pos.tolist() == [3, 4, 5, 6, 13, 14, 15, 16]
    assert two.query_tiles(4).tolist() == [[3, 7, 0, 10, 0, 3, 7, 3], [13, 17, 10, 20, 2, 13, 17, 9]]
    with pytest.raises(ValueError, match="consecutive rows"):  # queries past a sequence's end
        tiles.make_layout([0, 10, 20], [0, 2, 4], q_start=8, num_queries=4, seq_len=10)


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
    items, qlist, slots, bounds, _, valid = tiles.inverted_selection(idx, lay, ls, seg)
    assert bounds == [0, len(items)] == [0, tiles.item_bound(T, H, n, ls, seg, T, 2)]
    seen, listed = [], torch.zeros(T, H, n, dtype=torch.uint8)
    real = items[items[:, 4] > 0]
    assert (items[items[:, 4] == 0] == 0).all()  # padding: an empty key range, no queries
    assert torch.equal(items[:len(real)], real)  # the items first, then the padding
    for h, k0, k1, off, length, _ in real.tolist():
        assert 0 < length <= seg and k1 - k0 <= ls
        for t, j in zip(qlist[off:off + length].tolist(), slots[off:off + length].tolist()):
            doc_start = 0 if t < 9 else 9
            b = (k0 - doc_start) // ls
            assert int(idx[t, h].sort().values[j]) == b  # the slot: this choice in t's sorted list
            seen.append((t, h, b))
            listed[t, h, j] += 1
    # a block listed twice is listed once
    want = [(t, h, b) for t in range(T) for h in range(H) for b in sorted({int(x) for x in idx[t, h]}) if b >= 0]
    assert sorted(seen) == sorted(want)
    assert torch.equal(valid, listed)  # valid marks exactly the listed slots, each listed once
    assert any(len({int(x) for x in row}) < n for row in idx.view(-1, n))  # the case occurs here


def test_inverted_selection_drops_blocks_past_the_document():
    lay = _layout([0, 5, 13], [0, 1, 3])
    idx = torch.tensor([[[0, 1, 2]]] * 13)  # block 2 starts past both documents' ends
    items, qlist = tiles.inverted_selection(idx, lay, 4, 16)[:2]
    spans = sorted((int(k0), int(k1)) for _, k0, k1, _, n, _ in items.tolist() if n > 0)
    assert spans == [(0, 4), (4, 5), (5, 9), (9, 13)]  # document 0's block 1 is just position 4
    assert 13 * 2 == sum(length for *_, length, _ in items.tolist())  # two choices listed a position


def test_inverted_selection_can_leave_out_the_forced_blocks():
    """skip_forced lists exactly the choices that are neither block 0 nor a local block
    (floor(t/l') - 1, floor(t/l'), t local to its document): the range kernels run those."""
    gen = torch.Generator().manual_seed(3)
    cu, ls = [0, 13, 40], 4
    T, H, n = 40, 2, 5
    idx = torch.randint(-1, 9, (T, H, n), generator=gen)
    lay = _layout(cu, [0, 3, 9])
    items, qlist, slots, _, _, valid = tiles.inverted_selection(idx, lay, ls, 3, skip_forced=True)
    seen = set()
    for h, k0, k1, off, length, _ in items[items[:, 4] > 0].tolist():
        for t in qlist[off:off + length].tolist():
            ds = 0 if t < 13 else 13
            seen.add((t, h, (k0 - ds) // ls))
    want = set()
    for t in range(T):
        ds, de = (0, 13) if t < 13 else (13, 40)
        cb = (t - ds) // ls
        for h in range(H):
            for b in {int(x) for x in idx[t, h]}:
                if b > 0 and b < cb - 1 and ds + b * ls < de:
                    want.add((t, h, b))
    assert seen == want and len(want) > 20
    assert int(valid.sum()) == len(want)  # no forced slot is marked written


def test_inverted_selection_of_kernel_rows_skips_the_row_sort():
    """Rows as the selection kernel writes them (distinct, ascending, -1 last): without the
    per-row sort the same lists come out, and each slot still names its own block."""
    gen = torch.Generator().manual_seed(3)
    T, H, n, ls = 40, 3, 4, 4
    rows = []
    for _ in range(T * H):
        blocks = sorted(torch.randperm(10, generator=gen)[:int(torch.randint(0, n + 1, (1,), generator=gen))].tolist())
        rows.append(blocks + [-1] * (n - len(blocks)))
    idx = torch.tensor(rows).view(T, H, n)
    lay = _layout([0, 17, T], [0, 3, 8])
    for chunk in (None, 9):
        ref = tiles.inverted_selection(idx, lay, ls, 5, chunk)
        work = tiles.inverted_selection(idx, lay, ls, 5, chunk, rows_sorted=True)
        assert torch.equal(work.items, ref.items) and work.bounds == ref.bounds
        listed = int(ref.items[:, 4].sum())
        assert torch.equal(work.queries[:listed], ref.queries[:listed])
        assert int(work.valid.sum()) == int(ref.valid.sum()) == listed
        for h, k0, k1, off, length, _ in work.items.tolist():
            for t, j in zip(work.queries[off:off + length].tolist(), work.slots[off:off + length].tolist()):
                doc_start = 0 if t < 17 else 17
                assert int(idx[t, h, j]) == (k0 - doc_start) // ls and work.valid[t, h, j] == 1
    assert (idx == -1).any() and listed > 0


def test_inverted_selection_in_chunks_keeps_each_chunk_to_itself():
    gen = torch.Generator().manual_seed(2)
    T, H, n, ls = 23, 2, 3, 4
    idx = torch.randint(-1, 5, (T, H, n), generator=gen)
    lay = _layout([0, 10, T], [0, 2, 5])
    whole = tiles.inverted_selection(idx, lay, ls, 100)
    work = tiles.inverted_selection(idx, lay, ls, 100, chunk=7)
    assert work.chunk == 7 and len(work.bounds) == 5 and work.bounds[0] == 0
    assert work.bounds[-1] == len(work.items)
    assert all(work.bounds[c + 1] - work.bounds[c] == tiles.item_bound(min(7, T - 7 * c), H, n, ls, 100, T, 2)
               for c in range(4))
    pairs = set()
    for c in range(4):
        for h, k0, k1, off, length, _ in work.items[work.bounds[c]:work.bounds[c + 1]].tolist():
            for t, j in zip(work.queries[off:off + length].tolist(), work.slots[off:off + length].tolist()):
                assert 7 * c <= t < 7 * (c + 1)
                pairs.add((t, h, k0, j))
    want = set()
    for h, k0, k1, off, length, _ in whole.items.tolist():
        for t, j in zip(whole.queries[off:off + length].tolist(), whole.slots[off:off + length].tolist()):
            want.add((t, h, k0, j))
    assert pairs == want and len(want) > 0


def test_item_bound_holds_for_crowded_and_sparse_choices():
    """The padded per-chunk item rows are never fewer than the items: every position choosing
    the same few blocks (long lists, many segments), all distinct blocks (many short lists),
    several documents, every chunking."""
    gen = torch.Generator().manual_seed(4)
    cu = [0, 13, 14, 40, 64]
    lay = _layout(cu, [0, 3, 3, 9, 15])
    T, H, n, ls = 64, 3, 5, 4
    dense = torch.arange(n).repeat(T, H, 1)  # each position: blocks 0..4 of its document
    sparse = torch.stack([torch.randperm(7, generator=gen)[:n] for _ in range(T * H)]).view(T, H, n)
    for idx in (dense, sparse, torch.randint(-1, 8, (T, H, n), generator=gen)):
        for seg in (1, 2, 5, 64):
            for chunk in (None, 1, 5, 16):
                work = tiles.inverted_selection(idx, lay, ls, seg, chunk)
                count = work.items[:, 4] > 0
                ch = work.chunk
                for c in range(len(work.bounds) - 1):
                    part = work.items[work.bounds[c]:work.bounds[c + 1]]
                    for h, k0, k1, off, length, _ in part[part[:, 4] > 0].tolist():
                        assert all(ch * c <= t < ch * (c + 1) for t in work.queries[off:off + length].tolist())
                # every listed choice is in exactly one item: no item was lost to the bound
                assert int(work.items[count, 4].sum()) == int(work.valid.sum())


def test_selected_layout_choice_by_group_size_and_override():
    from nsa_dist.kernels.launch import LaunchConfig
    from nsa_dist.kernels.nsa import Geometry

    lay = _layout([0, 8], [0, 1])
    min_g = LaunchConfig().sel_query_min_g
    small = Geometry(lay, HQ=4 * 2, H=2, DK=16, DV=16)
    big = Geometry(lay, HQ=min_g * 2, H=2, DK=16, DV=16)
    assert small.sel_block_major() and not big.sel_block_major()
    assert not Geometry(lay, 8, 2, 16, 16, launch=LaunchConfig(sel_algo="query")).sel_block_major()
    with pytest.raises(ValueError, match="sel_algo"):
        LaunchConfig(sel_algo="blocks")


def test_selected_dq_layout_and_partial_dtype_choices():
    from nsa_dist.kernels.launch import LaunchConfig
    from nsa_dist.kernels.nsa import Geometry

    lay = _layout([0, 8], [0, 1])
    from nsa_dist.kernels.launch import SPLIT_BYTES
    split_bytes = SPLIT_BYTES
    small = Geometry(lay, HQ=4 * 2, H=2, DK=16, DV=16)
    big = Geometry(lay, HQ=LaunchConfig().sel_dq_query_min_g * 2, H=2, DK=16, DV=16)
    assert small.sel_dq_block_major() and not big.sel_dq_block_major()
    assert Geometry(lay, 32, 2, 16, 16, launch=LaunchConfig(sel_dq_algo="block")).sel_dq_block_major()
    # per-slot dq: scaled fp16 for 16-bit inputs, fp32 for fp32 inputs, unless asked
    assert small.dq_partial_dtype(torch.bfloat16) == torch.float16
    assert small.dq_partial_dtype(torch.float32) == torch.float32
    fp32 = Geometry(lay, 8, 2, 16, 16, launch=LaunchConfig(sel_dq_partial="fp32"))
    assert fp32.dq_partial_dtype(torch.bfloat16) == torch.float32
    # the chunk bounds the larger per-slot buffer: fp32 dq (16 * 4 B) over bf16 o + lse (16 * 2 + 4 B)
    assert fp32.split_chunk(4, torch.bfloat16) == split_bytes // (8 * 4 * 16 * 4)
    assert small.split_chunk(4, torch.bfloat16) == split_bytes // (8 * 4 * (16 * 2 + 4))
    fused = Geometry(lay, 32, 2, 16, 16, launch=LaunchConfig(sel_dq_algo="fused"))
    assert fused.sel_dq_block_major() and fused.sel_dq_fused() and not small.sel_dq_fused()
    # the per-slot bound: 2 GiB with or without the fused dq unless set; a set bound holds everywhere
    assert small.split_bytes() == fused.split_bytes() == SPLIT_BYTES == 1 << 31
    assert fused.split_chunk(4, torch.bfloat16) == SPLIT_BYTES // (32 * 4 * (16 * 2 + 4))
    for geo in (small, fused):
        geo.launch = LaunchConfig(sel_dq_algo=geo.launch.sel_dq_algo, split_bytes=4096)
        assert geo.split_bytes() == 4096
    # "auto" fuses the block-major dq into the dK/dV kernel from sel_dq_fused_min_dk (192: yes, 128: no,
    # G >= 16: position-major, never fused); "block" keeps the two kernels at any Dk
    min_dk = LaunchConfig().sel_dq_fused_min_dk
    assert Geometry(lay, 8, 2, 192, 128).sel_dq_fused() and Geometry(lay, 8, 2, min_dk, 128).sel_dq_fused()
    assert not Geometry(lay, 8, 2, 128, 128).sel_dq_fused() and not Geometry(lay, 8, 2, min_dk - 1, 128).sel_dq_fused()
    assert not Geometry(lay, 32, 2, 192, 128).sel_dq_fused()
    assert not Geometry(lay, 8, 2, 192, 128, launch=LaunchConfig(sel_dq_algo="block")).sel_dq_fused()
    assert not Geometry(lay, 8, 2, 192, 128, launch=LaunchConfig(sel_dq_fused_min_dk=256)).sel_dq_fused()
    with pytest.raises(ValueError, match="sel_dq_algo"):
        LaunchConfig(sel_dq_algo="fuse")
    with pytest.raises(ValueError, match="sel_dq_partial"):
        LaunchConfig(sel_dq_partial="bf16")


def test_selection_chunks_fit_their_key_tiles():
    """When ``chunk_fits`` says so, the compressed tokens overlapping a chunk of ``block_chunk``
    blocks fit the tiles, so the selection kernel loads them without a loop (brute force over
    valid (l, d, l') and every chunk start)."""
    from nsa_dist.kernels.selection import block_chunk, chunk_fits
    fits = 0
    for d in (1, 2, 4, 8, 16):
        for l in range(d, 65, d):
            for ls in range(l, 129, d):
                for tokens in (16, 32, 64, 128):
                    if not chunk_fits(l, d, ls, tokens):
                        continue
                    fits += 1
                    bj = block_chunk(l, d, ls, tokens)
                    for j0 in range(0, 20 * bj, bj):
                        lo = (j0 * ls - l) // d + 1 if j0 * ls >= l else 0  # the kernel's i_lo / i_hi
                        hi = ((j0 + bj) * ls - 1) // d + 1
                        assert hi - lo <= tokens, (l, d, ls, tokens, j0)
    assert fits > 1000 and not chunk_fits(16, 2, 32, 16)


def test_compiled_inverted_selection_equals_the_eager_one():
    """The torch.compile'd device part (the CUDA default, ``LaunchConfig.compile_tables``)
    builds the same integers as the eager ops: packed documents, chunks, forced blocks left out;
    packings with other document counts reuse one dynamic graph (no compile per packing)."""
    pytest.importorskip("triton")
    from torch._dynamo.utils import counters

    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(-1, 7, (200, 2, 5), generator=gen)
    before = counters["stats"]["unique_graphs"]
    for cu in ([0, 50, 130, 200], [0, 200], [0, 20, 60, 90, 200], [0, 10, 20, 30, 40, 200]):
        ccu = [0]
        for a, b in zip(cu[:-1], cu[1:]):
            ccu.append(ccu[-1] + max(0, (b - a - 16) // 8 + 1))
        lay = tiles.make_layout(cu, ccu)
        eager = tiles.inverted_selection(idx, lay, 16, 7, chunk=64, skip_forced=True)
        built = tiles.inverted_selection(idx, lay, 16, 7, chunk=64, skip_forced=True, compiled=True)
        assert eager.bounds == built.bounds and eager.chunk == built.chunk
        for name in ("items", "queries", "slots", "valid"):
            assert torch.equal(getattr(eager, name), getattr(built, name)), (cu, name)
    assert counters["stats"]["unique_graphs"] - before <= 2  # static, then one dynamic graph


@pytest.mark.parametrize("skip_forced", [False, True])
def test_inverted_selection_of_a_query_chunk_names_rows_and_key_blocks(skip_forced):
    """Queries [7, 30) of documents [0, 13), [13, 40): the lists hold query rows (position - 7),
    the items their blocks' key positions (from the document's start) and q_off = 7; forced
    blocks come from the position, not the row."""
    gen = torch.Generator().manual_seed(5)
    cu, ls, q0, nq = [0, 13, 40], 4, 7, 23
    H, n = 2, 4
    idx = torch.randint(-1, 7, (nq, H, n), generator=gen)
    lay = tiles.make_layout(cu, [0, 3, 9], q_start=q0, num_queries=nq)
    work = tiles.inverted_selection(idx, lay, ls, 3, chunk=9, skip_forced=skip_forced)
    seen = set()
    for h, k0, k1, off, length, q_off in work.items[work.items[:, 4] > 0].tolist():
        assert q_off == q0 and k1 - k0 <= ls
        for row in work.queries[off:off + length].tolist():
            t = row + q0
            ds = 0 if t < 13 else 13
            assert ds <= k0 < (13 if t < 13 else 40)  # the block is in the query's document
            seen.add((row, h, (k0 - ds) // ls))
    want = set()
    for row in range(nq):
        t = row + q0
        ds, de = (0, 13) if t < 13 else (13, 40)
        cb = (t - ds) // ls
        for h in range(H):
            for b in {int(x) for x in idx[row, h]}:
                if b >= 0 and ds + b * ls < de and not (skip_forced and (b == 0 or b >= cb - 1)):
                    want.add((row, h, b))
    assert seen == want and len(want) > (5 if skip_forced else 20)


@pytest.mark.slow
def test_compiled_inverted_selection_of_a_query_chunk_equals_the_eager_one():
    """The torch.compile'd lists (the CUDA default) of a query chunk: the same integers (~12 s
    of compilation on 2 cores)."""
    idx = torch.randint(-1, 9, (50, 2, 5), generator=torch.Generator().manual_seed(6))
    lay = tiles.make_layout([0, 30, 64, 100], [0, 6, 13, 21], q_start=20, num_queries=50)
    eager = tiles.inverted_selection(idx, lay, 4, 3, chunk=16, skip_forced=True)
    built = tiles.inverted_selection(idx, lay, 4, 3, chunk=16, skip_forced=True, compiled=True)
    assert eager.bounds == built.bounds and int(eager.items[:, 4].sum()) > 20
    for name in ("items", "queries", "slots", "valid"):
        assert torch.equal(getattr(eager, name), getattr(built, name)), name

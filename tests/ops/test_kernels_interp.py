"""Triton kernels against the PyTorch reference (SPEC.md), through the CPU interpreter.

Small shapes in fp32 (the interpreter mis-reads bf16); forward, selection and every gradient,
for several (l, d, l', n, w), group sizes G = 1, 2, 3, 4, packed documents and d != l.
"""
import pytest
import torch

from nsa_dist import NSAConfig
from nsa_dist.kernels.launch import LaunchConfig, use_launch
from nsa_dist.ops import nsa_attention, select_blocks
from nsa_inputs import args, random_nsa_inputs

from _interp import kernels_or_skip, max_rel, record_descriptors

NAMES = ("q", "k_cmp", "v_cmp", "k_sel", "v_sel", "k_win", "v_win", "gates")

CASES = {
    # name: (cfg kwargs, B, S, HQ, H, Dk, Dv, cu_seqlens)
    "G1": (dict(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=4, window=16), 1, 72, 2, 2, 16, 16, None),
    "G2-batch2": (dict(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=3, window=24), 2, 64, 4, 2, 16, 16, None),
    "G3-Dv32": (dict(cmp_block=16, cmp_stride=8, sel_block=16, num_selected=3, window=8), 1, 70, 3, 1, 16, 32, None),
    "G4-fla-cfg-w0": (dict(cmp_block=16, cmp_stride=16, sel_block=16, num_selected=3, window=0), 1, 64, 4, 1, 16, 16, None),
    "G2-packed": (dict(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=4, window=16), 1, 100, 4, 2, 16, 16,
                  [0, 37, 40, 100]),
    # three free choices a position past the forced blocks: selected work items of up to 180
    # rows, many steps of 16 rows (the "steps16" algorithms)
    "G2-long": (dict(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=6, window=16), 1, 160, 4, 2, 16, 16,
                None),
}


def _run(case, dtype=torch.float32):
    kernels, device = kernels_or_skip()
    kw, B, S, HQ, H, Dk, Dv, cu = CASES[case]
    cfg = NSAConfig(**kw)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    x = random_nsa_inputs(cfg, B=B, S=S, HQ=HQ, H=H, Dk=Dk, Dv=Dv, dtype=dtype, seed=1,
                          cu_seqlens=cu_t, requires_grad=True)
    return kernels, cfg, cu_t, x


SEL_ALGOS = ("block", "block-chunked", "query", "query-fwd-block-dq", "block-fwd-query-dq", "block-fused",
             "block-fused-chunked", "query-fwd-fused-dq", "block-hints-chunked", "block-steps16",
             "block-fused-steps16", "block-fused-steps16-chunked", "query-tma", "block-tma", "block-notma",
             "query-notma")
# (algorithm, case) run by default: every case block-major (the default), every other
# algorithm on one or more cases (the TMA and pointer loads, the chunked and fused paths on the
# packed case); the rest of the product with `-m slow`
SEL_DEFAULT = {("block", c) for c in CASES} | {
    ("block-chunked", "G2-packed"), ("query", "G1"), ("query", "G3-Dv32"),
    ("query-fwd-block-dq", "G1"), ("block-fwd-query-dq", "G3-Dv32"), ("block-fused", "G2-packed"), ("block-fused-chunked", "G2-packed"),
    ("query-fwd-fused-dq", "G1"), ("block-hints-chunked", "G2-packed"), ("block-steps16", "G2-long"),
    ("block-fused-steps16", "G2-long"), ("block-fused-steps16-chunked", "G2-long"),
    ("query-tma", "G2-packed"), ("query-tma", "G3-Dv32"), ("block-tma", "G2-packed"), ("block-tma", "G1"),
    ("block-notma", "G2-packed"), ("block-notma", "G3-Dv32"), ("query-notma", "G1")}


@pytest.fixture
def sel_algo(request, monkeypatch):
    """The selected forward and dq block-major (default for G < 16), the same in chunks of
    positions, position-major, one of each, the dq fused into the dK/dV kernel, with L2 hints,
    with 16 rows a step (many steps per work item), with the TMA loads counted ("-tma") or off
    ("-notma": the pointer loads, which Dk in pieces and odd G take anyway)."""
    kernels_or_skip()
    from nsa_dist.kernels import nsa, tma
    fwd_query = request.param.startswith("query")
    dq_query = request.param == "query" or request.param.endswith("query-dq")
    dq_algo = "fused" if "fused" in request.param else "query" if dq_query else "block"
    launch = LaunchConfig(sel_algo="query" if fwd_query else "block", sel_dq_algo=dq_algo,
                          sel_l2_hints="hints" in request.param, sel_tma="notma" not in request.param,
                          range_tma="notma" not in request.param, dkdv_tma="notma" not in request.param)
    chunks, rows_tma = [], []  # what the monkeypatched helpers below saw
    if "steps16" in request.param:
        launch = launch.replace(sel_split_rows=16, sel_dq_split_rows=16, sel_dkdv_rows=16,
                                sel_dkdv_dq_rows=16)
    if request.param in ("query-tma", "query-notma"):
        launch = launch.replace(sel_dq_algo="query")
    if request.param.endswith("-tma"):  # K / V tiles through TMA descriptors (range and selected kernels)
        record_descriptors(monkeypatch, tma, "kv_descriptors", chunks)
        record_descriptors(monkeypatch, tma, "row_descriptors", rows_tma)
    if request.param == "query":  # the backward's own dK/dV list, in short segments (1-4 positions)
        launch = launch.replace(sel_dkdv_seg_rows=4)
    if request.param.endswith("chunked"):
        launch = launch.replace(split_bytes=20000)  # 16-36 positions a chunk: 2-6 chunks per case
        work = nsa._sel_work

        def counted(*a, **kw):
            w = work(*a, **kw)
            chunks.append(len(w.bounds) - 1)
            return w
        monkeypatch.setattr(nsa, "_sel_work", counted)
    with use_launch(launch):
        yield request.param
    if request.param.endswith("chunked"):  # the chunked path really ran in several chunks
        assert chunks and max(chunks) > 1, chunks
    if request.param.endswith("-tma"):  # the range forwards and dq (and the selected ones) took descriptors
        assert len(chunks) >= (5 if request.param == "query-tma" else 3) and all(chunks), chunks
        if request.param == "block-tma":  # the range dK/dV's rows through TMA where G is a power of two
            _, _, _, HQ, H, *_ = CASES[request.node.callspec.params["case"]]
            G = HQ // H
            assert len(rows_tma) >= 2 and all(r == (G & (G - 1) == 0) for r in rows_tma), (G, rows_tma)


@pytest.mark.parametrize("sel_algo,case", [
    pytest.param(a, c, marks=() if (a, c) in SEL_DEFAULT else pytest.mark.slow) for a in SEL_ALGOS
    for c in sorted(CASES)], indirect=["sel_algo"])
def test_forward_selection_and_grads_match_reference(case, sel_algo):
    _, cfg, cu, x = _run(case)
    idx_ref = select_blocks(x["q"].detach(), x["k_cmp"].detach(), cfg, cu_seqlens=cu, backend="reference")
    idx_tri = select_blocks(x["q"].detach(), x["k_cmp"].detach(), cfg, cu_seqlens=cu, backend="triton")
    assert torch.equal(idx_ref, idx_tri), "selection differs from the reference"
    o_ref = nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="reference")
    o_tri = nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="triton")  # selects on its own
    assert max_rel(o_tri, o_ref) < 1e-5
    do = torch.randn_like(o_ref)
    g_ref = torch.autograd.grad(o_ref, args(x), do, allow_unused=True)
    g_tri = torch.autograd.grad(o_tri, args(x), do, allow_unused=True)
    for name, a, b in zip(NAMES, g_tri, g_ref):
        if b is None:  # the window branch is off (w = 0): the reference leaves k_win/v_win unused
            assert a is None or float(a.abs().max()) == 0.0, name
            continue
        assert max_rel(a, b) < 1e-4, f"d{name} differs: {max_rel(a, b):.2e}"


def test_zero_gates_match_reference_and_negative_gates_are_loud():
    """The backward folds each gate into its branch's log-sum-exp (lse - log2 g, gates.py): a
    gate of exactly 0 (no gradient through that branch's attention, rows of every branch) still
    equals the reference; a negative gate, outside SPEC's sigmoid, gives NaN gradients rather
    than silently wrong ones."""
    _, cfg, cu, x = _run("G2-batch2")
    g = x["gates"].detach().clone()
    g[:, ::3, :, 0] = 0.0  # every third position: the compressed branch's gate
    g[:, 1::3, :2, 1] = 0.0  # the selected branch's, two heads
    g[:, 2::5, :, 2] = 0.0  # the window's
    x["gates"] = g.requires_grad_(True)
    o_ref = nsa_attention(*args(x), cfg, backend="reference")
    o_tri = nsa_attention(*args(x), cfg, backend="triton")
    assert max_rel(o_tri, o_ref) < 1e-5
    do = torch.randn_like(o_ref)
    g_ref = torch.autograd.grad(o_ref, args(x), do)
    g_tri = torch.autograd.grad(o_tri, args(x), do)
    for name, a, b in zip(NAMES, g_tri, g_ref):
        assert torch.isfinite(a).all(), name
        assert max_rel(a, b) < 1e-4, f"d{name} differs: {max_rel(a, b):.2e}"
    neg = x["gates"].detach().clone()
    neg[0, 5, 1, 1] = -0.5
    x["gates"] = neg.requires_grad_(True)
    o_tri = nsa_attention(*args(x), cfg, backend="triton")
    dq = torch.autograd.grad(o_tri, x["q"], do)[0]
    assert torch.isnan(dq[0, 5, 1]).any()


@pytest.mark.parametrize("case", ["G2-packed", "G2-long"])
def test_unwritten_slots_are_never_read(case, monkeypatch):
    """The block-major kernels' per-slot buffers start as NaN: the forward's and the dq's merges
    read only the slots the work list names (``SelWork.valid``), so nothing changes."""
    from nsa_dist.kernels import nsa
    made = []

    def poisoned(shape, dtype, device):
        made.append(shape)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(nsa, "_slots", poisoned)
    _matches_reference_under(case, dict(sel_algo="block", sel_dq_algo="block"))
    assert len(made) >= 4, made  # the forward's o / lse slots and the dq's slots and scales


def _matches_reference_under(case: str, settings: dict, names: tuple = NAMES) -> None:
    """``case`` through the kernels under launch ``settings``: the output and the gradients of
    ``names`` (a prefix of NAMES) equal the reference's (each nonzero, so the check checks)."""
    _, cfg, cu, x = _run(case)
    o_ref = nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="reference")
    with use_launch(LaunchConfig(**settings)):
        o_tri = nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="triton")
        do = torch.randn_like(o_ref)
        g_tri = torch.autograd.grad(o_tri, args(x)[:len(names)], do)
    g_ref = torch.autograd.grad(o_ref, args(x)[:len(names)], do)
    assert max_rel(o_tri, o_ref) < 1e-5
    for name, a, b in zip(names, g_tri, g_ref):
        assert float(b.abs().max()) > 0, f"d{name} is zero: the comparison checks nothing"
        assert max_rel(a, b) < 1e-4, f"d{name} differs: {max_rel(a, b):.2e}"


def _record_chunks(monkeypatch, method: str) -> list:
    """The (positions per chunk, chunks) each call of ``nsa.Geometry.<method>`` returns."""
    from nsa_dist.kernels import nsa
    chunks = []
    orig = getattr(nsa.Geometry, method)
    monkeypatch.setattr(nsa.Geometry, method, lambda self, n: chunks.append(orig(self, n)) or chunks[-1])
    return chunks


@pytest.mark.parametrize("case", ["G1", pytest.param("G2-batch2", marks=pytest.mark.slow), "G2-packed"])
def test_chunked_compressed_and_first_block_dkdv_match_reference(case, monkeypatch):
    """The dK/dV of keys every later query sees, split over query chunks (fp32 atomic sums),
    as at long context: the compressed branch's in chunks of 16 positions, selection block
    0's (the kernels select, so the forced blocks run in the range kernels) in chunks of 8
    (in G1 and G2-batch2 the last chunk ends exactly at the document's end)."""
    chunks = _record_chunks(monkeypatch, "first_chunks")
    _matches_reference_under(case, dict(dkdv_qchunk=16, first_min_chunk=8), NAMES[:5])
    assert chunks and chunks[-1][1] > 1, chunks  # block 0's queries did span several chunks


@pytest.mark.parametrize("case", ["G1", "G2-packed"])
def test_compressed_dkdv_chunked_for_programs_matches_reference(case, monkeypatch):
    """``dkdv_programs``: the compressed dK/dV's query chunks shrink (from dkdv_qchunk's 4096 to
    at least first_min_chunk's 8 positions) until about that many programs have queries: the
    chunks came out shorter than the sequence, and dK/dV still equal the reference."""
    chunks = _record_chunks(monkeypatch, "dkdv_chunks")
    _matches_reference_under(case, dict(dkdv_programs=4096, first_min_chunk=8), NAMES[:3])
    assert chunks and chunks[-1][1] > 1 and 8 <= chunks[-1][0] < 4096, chunks


def test_fp16_forward_and_grads_close_to_fp32_reference():
    _, cfg, cu, x = _run("G2-batch2", dtype=torch.float16)
    x32 = {k: v.detach().float().requires_grad_(True) for k, v in x.items()}
    o_ref = nsa_attention(*args(x32), cfg, backend="reference")
    idx = select_blocks(x32["q"].detach(), x32["k_cmp"].detach(), cfg, backend="reference")
    o = nsa_attention(*args(x), cfg, backend="triton", block_indices=idx)
    assert o.dtype == torch.float16
    assert max_rel(o, o_ref) < 5e-3
    do = torch.randn_like(o_ref)
    g_ref = torch.autograd.grad(o_ref, args(x32), do)
    g = torch.autograd.grad(o, args(x), do.half())
    for name, a, b in zip(NAMES, g, g_ref):
        assert max_rel(a, b) < 1e-2, f"d{name}: {max_rel(a, b):.2e}"


@pytest.mark.parametrize("mag,dq_algo", [(1e-25, "block"), pytest.param(1.0, "block", marks=pytest.mark.slow),
                                         (1e25, "block"), (1e25, "fused")])
def test_scaled_fp16_dq_partials_keep_precision_at_any_magnitude(mag, dq_algo, monkeypatch):
    """The block-major dq's per-slot results as fp16 with a power-of-two scale per (row, slot):
    fp16 precision whatever the gradient's magnitude (plain fp16 would flush 1e-25 to zero and
    overflow at 1e25), over several chunks of positions (the scales' offsets per chunk); from
    the dq kernel or from the dK/dV kernel (``sel_dq_algo="fused"``)."""
    kernels, cfg, cu, x = _run("G2-packed")
    from nsa_dist.kernels import nsa
    chunks, work = [], nsa._sel_work
    monkeypatch.setattr(nsa, "_sel_work", lambda *a, **kw: chunks.append(work(*a, **kw)) or chunks[-1])
    o_ref = nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="reference")
    with use_launch(LaunchConfig(sel_dq_algo=dq_algo, sel_dq_partial="fp16s", split_bytes=20000)):
        o_tri = nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="triton")
    do = torch.randn_like(o_ref) * mag
    dq_ref, = torch.autograd.grad(o_ref, x["q"], do)
    dq_tri, = torch.autograd.grad(o_tri, x["q"], do)
    a, b = dq_tri.double(), dq_ref.double()
    err = float((a - b).abs().max() / b.abs().max())  # relative at any scale (max_rel floors at 1e-6)
    assert torch.isfinite(dq_tri).all() and float(dq_ref.abs().max()) > 0
    assert 1e-5 < err < 1e-3, f"dq differs by {err:.2e}"  # fp16-sized, not fp32-exact (it ran)
    assert chunks and len(chunks[-1].bounds) - 1 > 1  # several chunks


SELECTION_SHAPES = [
    (16, 16, 1, True, 1, 8, 4, 16, 4, False),  # 16 positions a program, 3 blocks a merge
    (16, 16, 2, False, 1, 8, 4, 16, 4, False),  # the same with the sort-only merge, 2 key tiles a merge
    (16, 16, 1, True, 32, 16, 8, 32, 3, False),  # G = 32: one position a program
    (128, 16, 1, False, 3, 8, 4, 16, 5, False),  # G = 3 in 4 head slots
    (16, 64, 1, True, 2, 4, 4, 4, 20, "off"),  # 64 blocks a merge (wider than the top-n), n > 16
    (16, 16, 1, True, 2, 16, 2, 32, 3, False),  # one block overlaps 23 compressed tokens: a key-tile loop
    # chunks of whole blocks: R = l'/d = 1-4 tokens start in a block, E = l/d = 1-4 strides a
    # token, spilling into the next block when E > 1; groups of 1-16, both merges, n above 16,
    # n well above the 3 forced blocks so that the importance decides
    (16, 32, 1, True, 1, 4, 2, 4, 6, True),
    (64, 64, 1, False, 3, 3, 1, 4, 7, True),
    # G = 32: the general chunks (< 16 positions a program); by default at G = 16 (4 positions a
    # program) in test_head_dims.py's test_fp32_selection_at_dk_256_and_a_group_of_16_...
    pytest.param(16, 32, 1, True, 32, 4, 2, 4, 6, False, marks=pytest.mark.slow),
    (16, 64, 1, True, 2, 4, 4, 4, 20, True),  # l = l' = d: one token a block (the identity product)
    (16, 64, 1, True, 16, 4, 4, 4, 6, True),
    (32, 64, 1, True, 4, 4, 1, 4, 7, True),
    (16, 32, 1, True, 2, 4, 2, 4, 6, "off"),  # the general chunking where whole blocks would do
]
# the key tiles through TMA by default on three shapes (one a program, G = 3 in 4 head slots,
# chunks of whole blocks); on every shape with `-m slow`
SELECTION_TMA_DEFAULT = {(16, 16, 1, True, 1, 8, 4, 16, 4, False), (128, 16, 1, False, 3, 8, 4, 16, 5, False),
                         (16, 32, 1, True, 1, 4, 2, 4, 6, True)}


def _selection_params():
    for shape in SELECTION_SHAPES:
        values, marks = (shape.values, shape.marks) if hasattr(shape, "values") else (shape, ())
        for tma in (False, True):
            slow = tma and tuple(values) not in SELECTION_TMA_DEFAULT
            yield pytest.param(*values, tma, marks=tuple(marks) + ((pytest.mark.slow,) if slow else ()),
                               id="-".join(["tma" if tma else "pointers", *map(str, values)]))


@pytest.mark.parametrize("rows,keys,span,merge,G,l,d,ls,n,aligned,tma", list(_selection_params()))
def test_selection_tiles_and_chunks_match_reference(rows, keys, span, merge, G, l, d, ls, n, aligned, tma,
                                                    monkeypatch):
    """The selection kernel in each of its program shapes, chunkings and merges, over documents
    of several chunks of blocks merged into the running top-n ("off": chunks of whole blocks
    turned off), its key tiles through pointer loads or a TMA descriptor (``select_tma``)."""
    kernels, _ = kernels_or_skip()
    from nsa_dist.kernels import selection as sel
    if merge and not sel.HAS_BITONIC_MERGE:
        pytest.skip("this Triton has no tl.topk / tl.bitonic_merge")
    launch = LaunchConfig(select_rows=rows, select_rows_aligned=rows, select_keys=keys, select_span=span,
                          select_merge=merge, select_tma=tma, range_tma=False)  # only the selection counted
    from nsa_dist.kernels import tma as tma_mod
    made = []  # per descriptor call: were descriptors made
    record_descriptors(monkeypatch, tma_mod, "kv_descriptors", made)
    np_ = max(16, 1 << (n - 1).bit_length())
    gp = 1 << (G - 1).bit_length()
    assert sel.aligned_chunks(l, d, ls, keys, span, np_, gp) == (aligned is not False)  # the path it names
    if aligned == "off":
        monkeypatch.setattr(sel, "aligned_chunks", lambda *a: False)
    aligned = aligned is True
    cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=ls, num_selected=n, window=0)
    cu = torch.tensor([0, 120, 127, 150], dtype=torch.int32)
    x = random_nsa_inputs(cfg, S=150, HQ=G, H=1, Dk=16, seed=5, cu_seqlens=cu)
    ref = select_blocks(x["q"], x["k_cmp"], cfg, cu_seqlens=cu, backend="reference")
    with use_launch(launch):
        got = kernels.select_blocks(x["q"], x["k_cmp"], cfg, cu_seqlens=cu)
    assert torch.equal(ref, got)
    assert made == ([True] if tma else []), made  # the descriptor was made and passed
    nblocks = -(-120 // ls)
    chunk = keys // (ls // d) if aligned else sel.block_chunk(l, d, ls, keys * span)
    assert nblocks > min(chunk, n)  # several merges, or n binds
    # one case takes the kernel's key-tile loop, the others load a chunk's tiles without one
    assert aligned or sel.chunk_fits(l, d, ls, keys * span) == ((l, d, ls) != (16, 2, 32))


def test_ties_go_to_the_lower_block():
    """q = 0 makes every visible compressed token equally likely: equal-overlap blocks tie."""
    kernels, _ = kernels_or_skip()
    cfg = NSAConfig(cmp_block=16, cmp_stride=16, sel_block=16, num_selected=4, window=0)
    x = random_nsa_inputs(cfg, S=128, HQ=2, H=1, Dk=16, seed=3)
    q = torch.zeros_like(x["q"])
    ref = select_blocks(q, x["k_cmp"], cfg, backend="reference")
    got = kernels.select_blocks(q, x["k_cmp"], cfg)
    assert torch.equal(ref, got)
    # position 127: forced 0, 7, 6; the free slot goes to block 1, the lowest of the ties
    assert got[0, 127, 0].tolist() == [0, 1, 6, 7]


def test_given_block_indices_are_used():
    """block_indices replaces the selection: with only the forced blocks the output changes."""
    kernels, _ = kernels_or_skip()
    _, cfg, _, x = _run("G1")
    idx = select_blocks(x["q"].detach(), x["k_cmp"].detach(), cfg, backend="reference")
    only_first = torch.where(idx == idx[..., :1], idx, torch.full_like(idx, -1))
    o_a = kernels.nsa_attention(*args(x), cfg, block_indices=idx)
    o_b = kernels.nsa_attention(*args(x), cfg, block_indices=only_first)
    o_ref = nsa_attention(*args(x), cfg, backend="reference", block_indices=only_first)
    assert max_rel(o_b, o_ref) < 1e-5
    assert float((o_a - o_b).detach().abs().max()) > 1e-3


@pytest.mark.parametrize("case", ["G2-packed", "G3-Dv32"])
def test_canonical_block_indices_take_the_forced_block_path(case, monkeypatch):
    """select_blocks's output passed with canonical_indices (as the model does) runs the forced
    blocks in the range kernels and matches the reference, forward and every gradient."""
    kernels_or_skip()
    from nsa_dist.kernels import nsa
    forced = []
    split = nsa.Geometry.forced_split
    monkeypatch.setattr(nsa.Geometry, "forced_split", lambda self: forced.append(split(self)) or forced[-1])
    _, cfg, cu, x = _run(case)
    idx = select_blocks(x["q"].detach(), x["k_cmp"].detach(), cfg, cu_seqlens=cu, backend="triton")
    o_ref = nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="reference", block_indices=idx)
    do = torch.randn_like(o_ref)
    grads_ref = torch.autograd.grad(o_ref, [x[k] for k in NAMES], do)
    o = nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="triton", block_indices=idx, canonical_indices=True)
    grads = torch.autograd.grad(o, [x[k] for k in NAMES], do)
    assert forced and all(forced)
    assert max_rel(o, o_ref) < 1e-5
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert max_rel(g, g_ref) < 1e-4, name


def test_canonical_indices_without_indices_is_refused():
    _, cfg, _, x = _run("G1")
    with pytest.raises(ValueError, match="canonical_indices=True describes block_indices"):
        nsa_attention(*args(x), cfg, backend="reference", canonical_indices=True)


@pytest.mark.slow
def test_group_of_16_matches_reference():
    _, cfg, cu, x = _run("G1")
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=4, window=16)
    x = random_nsa_inputs(cfg, S=48, HQ=16, H=1, Dk=16, seed=2, requires_grad=True)
    o_ref = nsa_attention(*args(x), cfg, backend="reference")
    o_tri = nsa_attention(*args(x), cfg, backend="triton")
    assert max_rel(o_tri, o_ref) < 1e-5
    do = torch.randn_like(o_ref)
    for name, a, b in zip(NAMES, torch.autograd.grad(o_tri, args(x), do), torch.autograd.grad(o_ref, args(x), do)):
        assert max_rel(a, b) < 1e-4, name


def test_selection_block_change_on_the_same_packing_keeps_dkdv_right():
    """The forced blocks' tile table depends on l': a call with a larger l' after a smaller one
    on the same shapes must not reuse the first call's (cached) block-0 tiles."""
    kernels_or_skip()
    for ls in (16, 32):
        cfg = NSAConfig(cmp_block=16, cmp_stride=16, sel_block=ls, num_selected=3, window=16)
        x = random_nsa_inputs(cfg, B=1, S=160, HQ=2, H=1, Dk=16, Dv=16, dtype=torch.float32, seed=2,
                              requires_grad=True)
        do = torch.randn(1, 160, 2, 16, generator=torch.Generator().manual_seed(0))
        grads = []
        for backend in ("reference", "triton"):
            for t in x.values():
                t.grad = None
            nsa_attention(*args(x), cfg, backend=backend).backward(do)
            grads.append({k: x[k].grad.clone() for k in ("k_sel", "v_sel")})
        for k in ("k_sel", "v_sel"):
            assert max_rel(grads[1][k], grads[0][k]) < 1e-5, (ls, k)


@pytest.mark.parametrize("case,algos", [("G2-packed", ("block", "block")), ("G4-fla-cfg-w0", ("block", "block")),
                                        ("G1", ("query", "block"))])
def test_two_stream_order_matches_reference(case, algos, monkeypatch):
    """``overlap_branches`` set on the CPU (no second stream there: the same launches on one
    stream, the backward's tables built before the fork point): the same results as the
    reference."""
    _, cfg, cu, x = _run(case)
    from nsa_dist.kernels import nsa
    built = []
    tables = nsa._backward_tables
    monkeypatch.setattr(nsa, "_backward_tables", lambda *a: built.append(1) or tables(*a))
    o_ref = nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="reference")
    with use_launch(LaunchConfig(overlap_branches=True, sel_algo=algos[0], sel_dq_algo=algos[1])):
        o_tri = nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="triton")
    assert max_rel(o_tri, o_ref) < 1e-5
    do = torch.randn_like(o_ref)
    g_ref = torch.autograd.grad(o_ref, args(x), do, allow_unused=True)
    g_tri = torch.autograd.grad(o_tri, args(x), do, allow_unused=True)
    for name, a, b in zip(NAMES, g_tri, g_ref):
        if b is None:  # no window: the reference leaves k_win / v_win unused
            assert a is None or float(a.abs().max()) == 0.0, name
            continue
        assert max_rel(a, b) < 1e-4, f"d{name} differs: {max_rel(a, b):.2e}"
    assert built, "the backward did not take the two-stream order"


def _off_and_on(x, cfg, cu, setting: str, settings: dict, check) -> tuple:
    """(outputs, gradients, the output gradient) of the Triton call with launch ``setting`` off,
    then on (``settings`` both times; one output gradient for both); ``check(on)`` after each
    call must hold (what ran)."""
    outs, grads, do = [], [], None
    for on in (False, True):
        with use_launch(LaunchConfig(**{setting: on}, **settings)):
            o = nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="triton")
            do = torch.randn_like(o) if do is None else do
            grads.append(torch.autograd.grad(o, args(x), do, allow_unused=True))
        outs.append(o.detach())
        assert check(on), (setting, on)
    return outs, grads, do


def _assert_equal_grads(grads) -> None:
    """The off and on runs' gradients of every input, bit for bit (None alike)."""
    for name, a, b in zip(NAMES, grads[1], grads[0]):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name


@pytest.mark.parametrize("case,settings", [
    ("G2-packed", dict(sel_algo="block")), ("G2-packed", dict(sel_algo="block", split_bytes=20000)),
    ("G4-fla-cfg-w0", dict(sel_algo="block")), ("G1", dict(sel_algo="query")),
    ("G2-packed", dict(sel_algo="query"))])
def test_gate_fused_output_matches_separate_combination(case, settings, monkeypatch):
    """``gate_fused``: the selected branch's last kernel (the position-major forward, or the
    block-major merge, in several chunks with a small ``split_bytes``) writes the gate
    combination itself; no separate combination runs, and the output and every gradient are
    those of the separate combination (which rounds alike) and of the reference."""
    _, cfg, cu, x = _run(case)
    from nsa_dist.kernels import nsa
    calls = []
    combine = nsa.combine
    monkeypatch.setattr(nsa, "combine", lambda *a: calls.append(1) or combine(*a))
    # only the unfused call combines separately
    outs, grads, _ = _off_and_on(x, cfg, cu, "gate_fused", settings, lambda on: len(calls) == 1)
    assert torch.equal(outs[1], outs[0])
    assert max_rel(outs[1], nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="reference")) < 1e-5
    _assert_equal_grads(grads)


def test_register_capped_split_kernels_match_reference(monkeypatch):
    """``sel_split_regs`` / ``sel_dq_split_regs`` reach the block-major split launches as
    ``maxnreg`` (a compile option; the interpreter runs the same code) and ``sel_l2_hints`` every
    block-major launch as its eviction policies (the interpreter ignores them); no result changes."""
    from nsa_dist.kernels import nsa
    seen = []
    args_of = nsa._sel_block_args
    monkeypatch.setattr(nsa, "_sel_block_args", lambda geo, c, k, *a: seen.append((k, args_of(geo, c, k, *a)))
                        or seen[-1][1])
    _matches_reference_under("G2-packed", dict(sel_algo="block", sel_dq_algo="block", sel_split_regs=168,
                                               sel_dq_split_regs=128, sel_l2_hints=True))
    caps = {k: kw.get("maxnreg") for k, kw in seen}
    assert caps == {"sel_split": 168, "sel_dq_split": 128, "sel_dkdv": None}, caps
    hints = {(kw["EVQ"], kw["EVS"]) for _, kw in seen}
    assert hints == {("evict_last", "evict_first")}, hints


class _RecordLaunches:
    """Stands in for a Triton kernel: records each launch's (MODE, BLOCK_M, BLOCK_N, warps,
    stages), then launches the kernel."""

    def __init__(self, kernel, seen: list):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*a, **kw):
            self.seen.append((kw["MODE"], kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]))
            return self.kernel[grid](*a, **kw)
        return launch


def test_compressed_forward_tiles_of_its_own_match_reference(monkeypatch):
    """``range_cmp_fwd_rows`` / ``_keys`` / ``range_cmp_fwd`` reach the compressed branch's
    forward only (MODE 0: the selection's and the attention's), the window and forced-block
    forwards keep ``range_fwd``'s; the output, the selection and every gradient stay the
    reference's."""
    from nsa_dist.kernels import nsa
    seen = []
    monkeypatch.setattr(nsa, "_range_fwd", _RecordLaunches(nsa._range_fwd, seen))
    _matches_reference_under("G2-packed", dict(range_cmp_fwd_rows=16, range_cmp_fwd_keys=16, range_cmp_fwd=(2, 2)))
    default = LaunchConfig()
    assert {s[1:] for s in seen if s[0] == 0} == {(16, 16, 2, 2)}, seen
    assert all(s[1:] != (16, 16, 2, 2) for s in seen if s[0] != 0), seen
    assert any(s[2] == default.range_fwd_keys and s[3:] == default.range_fwd for s in seen if s[0] != 0), seen


@pytest.mark.parametrize("algo,forced", [("block", True), ("block", False), ("query", False)])
def test_forced_blocks_in_the_selected_kernels_match_reference(algo, forced, monkeypatch):
    """``sel_forced=False``: the selected kernels attend to the forced blocks (0 and the two
    local ones) themselves instead of the range kernels (A/B'd on an H200 in the fourteenth
    session, slower, so not the default): then no forced-block range forward (MODE 2) runs, with
    the default one does; the output and every gradient stay the reference's, block- and
    position-major."""
    from nsa_dist.kernels import nsa
    seen = []
    monkeypatch.setattr(nsa, "_range_fwd", _RecordLaunches(nsa._range_fwd, seen))
    _matches_reference_under("G2-packed", dict(sel_forced=forced, sel_algo=algo, sel_dq_algo=algo))
    modes = {s[0] for s in seen}
    assert {0, 1} <= modes and (modes - {0, 1} != set()) == forced, modes


@pytest.mark.parametrize("case,settings", [
    ("G2-packed", dict(sel_algo="block")), ("G2-packed", dict(sel_algo="block", split_bytes=20000, gate_fused=True)),
    ("G1", dict(sel_algo="query")), ("G3-Dv32", dict(sel_algo="query", gate_fused=True)),
    ("G4-fla-cfg-w0", dict(sel_algo="block"))])
def test_window_and_forced_blocks_in_one_launch_match_separate_launches(case, settings, monkeypatch):
    """``window_forced``: one range-forward launch (MODE 3) runs the window and then the forced
    blocks (q loaded once) instead of two (MODES 1 and 2); without a window the forced blocks
    keep their own launch. The output and every gradient equal the separate launches' bit for
    bit (with ``gate_fused`` too: block-major in chunks, position-major) and the reference's."""
    _, cfg, cu, x = _run(case)
    from nsa_dist.kernels import nsa
    seen = []
    monkeypatch.setattr(nsa, "_range_fwd", _RecordLaunches(nsa._range_fwd, seen))
    window = cfg.window > 0
    want = {False: {0, 1, 2} if window else {0, 2}, True: {0, 3} if window else {0, 2}}

    def modes_ran(on):
        ran = {m[0] for m in seen}
        seen.clear()
        return ran == want[on]
    outs, grads, _ = _off_and_on(x, cfg, cu, "window_forced", settings, modes_ran)
    assert torch.equal(outs[1], outs[0])
    assert max_rel(outs[1], nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="reference")) < 1e-5
    _assert_equal_grads(grads)


@pytest.mark.parametrize("case,settings", [
    ("G2-packed", dict(sel_algo="block")), ("G4-fla-cfg-w0", dict(sel_algo="block")),
    ("G1", dict(sel_algo="query", sel_dq_algo="query")),
    ("G2-packed", dict(sel_algo="block", sel_dq_algo="fused", gate_fused=True, window_forced=True)),
    ("G3-Dv32", dict(sel_algo="block", sel_forced=False))])
def test_gate_backward_in_the_range_dq_matches_the_separate_kernel(case, settings, monkeypatch):
    """``gate_bwd_fused``: the range dq's prologue computes the gate backward (dg, each branch's
    lse - log2 g and <do, o_b>) for the kernels after it; no separate gate backward runs, and
    every gradient equals the separate kernel's bit for bit (with and without a window, block-
    and position-major, the fused selected dq, the forced blocks in the selected kernels) and
    the reference's."""
    _, cfg, cu, x = _run(case)
    from nsa_dist.kernels import nsa
    calls = []
    real = nsa.combine_backward
    monkeypatch.setattr(nsa, "combine_backward", lambda *a: calls.append(1) or real(*a))
    # only the unfused backward runs the separate kernel
    _, grads, do = _off_and_on(x, cfg, cu, "gate_bwd_fused", settings, lambda on: len(calls) == 1)
    _assert_equal_grads(grads)
    o_ref = nsa_attention(*args(x), cfg, cu_seqlens=cu, backend="reference")
    for name, a, w in zip(NAMES, grads[1], torch.autograd.grad(o_ref, args(x), do, allow_unused=True)):
        if w is not None:
            assert max_rel(a, w) < 1e-4, f"d{name}: {max_rel(a, w):.2e}"


def test_key_descriptors_need_an_unpadded_dv_only_where_v_is_loaded():
    """``tma.kv_descriptors``: with a padded Dv (24 -> 32) the K / V pair keeps the pointer loads,
    while the selection's K alone (no V) still takes a descriptor."""
    kernels_or_skip()
    from nsa_dist.kernels import tma
    from nsa_dist.kernels.nsa import make_geometry

    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=4, window=16)
    x = random_nsa_inputs(cfg, S=64, HQ=4, H=2, Dk=16, Dv=24, seed=1)
    geo = make_geometry(x["q"], x["k_cmp"], x["v_sel"], cfg, None)
    assert tma.kv_descriptors(x["k_sel"], x["v_sel"], geo, 16) == (None, None)
    kd, vd = tma.kv_descriptors(x["k_cmp"], None, geo, 16)
    assert kd is not None and vd is None

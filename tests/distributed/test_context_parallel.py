"""Context parallelism against one device (gloo processes, float64): outputs, input and
weight gradients, selected blocks, loss, recorded traffic (cp_workers.py asserts them)."""
import os
from pathlib import Path

import pytest
import torch

import cp_workers as W
from dist_harness import run_world
from nsa_dist.parallel import ParallelConfig, ParallelState
from nsa_dist.parallel.context import check_cp_seq_len, gather_sequence, zigzag_chunks, zigzag_shard

ROOT = Path(__file__).parents[2]
# (world, kwargs). Packed documents cross the zigzag chunk boundaries; at cp=4 a chunk (8
# positions) is shorter than the window (16).
LAYOUTS = {
    "cp2": (2, dict(cp=2)),
    "cp2_packed": (2, dict(cp=2, packed=True)),
    "cp4_packed": (4, dict(cp=4, packed=True)),
    "cp2_x_tp2": (4, dict(cp=2, tp=2)),
    "cp2_x_ulysses2_packed": (4, dict(cp=2, sp=2, packed=True)),
}
# slower or rarer combinations
SLOW_LAYOUTS = {
    "cp4": (4, dict(cp=4)),
    "cp2_x_tp2_packed": (4, dict(cp=2, tp=2, packed=True)),
    "cp2_x_ulysses2": (4, dict(cp=2, sp=2)),
    # tp > H: a group's heads on two ranks, the selection agreed per query chunk
    "cp2_x_tp2_h1_gather_q": (4, dict(cp=2, tp=2, num_heads=4, num_kv_heads=1, selection_comm="gather_q")),
    "cp2_x_tp2_h1_importance_packed": (4, dict(cp=2, tp=2, num_heads=4, num_kv_heads=1, packed=True,
                                               selection_comm="importance")),
    # Megatron SP inside TP, within each CP shard
    "cp2_x_tp2_megatron_sp": (4, dict(cp=2, tp=2, megatron_sp=True)),
}


def _run(name, layouts):
    world, kw = layouts[name]
    results = run_world(W.cp_worker, world, **kw)
    assert len({r["loss"] for r in results}) == 1, "ranks disagree on the loss"
    for r in results:
        assert r["loss_err"] < 1e-12 and r["model_grad_err"] < 1e-10
        assert r["layer_out_err"] < 1e-10 and r["layer_grad_err"] < 1e-10


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_context_parallel_matches_one_device(name):
    _run(name, LAYOUTS)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_LAYOUTS))
def test_context_parallel_more_layouts(name):
    _run(name, SLOW_LAYOUTS)


# CP on the Triton backend (interpreter: 5-8 s a layout on 2 cores)
TRITON_LAYOUTS = {
    "cp2_packed": (2, dict(cp=2, packed=True)),
    "cp2": (2, dict(cp=2)),  # B = 2 sequences: each one's chunk at its own row offset
}
SLOW_TRITON_LAYOUTS = {
    # the group's heads on two ranks: the reference selects with the importance summed over
    # them, the kernels attend with that selection at the chunk's offset
    "cp2_x_tp2_h1_importance": (4, dict(cp=2, tp=2, num_kv_heads=1, selection_comm="importance")),
    # or the kernels select from the group's gathered queries at the offset, then attend
    "cp2_x_tp2_h1_gather_q_packed": (4, dict(cp=2, tp=2, num_kv_heads=1, packed=True, selection_comm="gather_q")),
}


@pytest.mark.parametrize("name", list(TRITON_LAYOUTS) + [pytest.param(n, marks=pytest.mark.slow)
                                                         for n in SLOW_TRITON_LAYOUTS])
def test_context_parallel_with_the_triton_kernels(name):
    """CP on the Triton backend (no reference fallback: the kernels take the query chunks'
    offsets), through the CPU interpreter, equals one device with the same kernels."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the interpreter run is for CPU machines; on a GPU see tests/ops/test_kernels_gpu.py")
    if os.environ.get("TRITON_INTERPRET") != "1":  # tests/conftest.py switches it on without CUDA
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    world, kw = {**TRITON_LAYOUTS, **SLOW_TRITON_LAYOUTS}[name]
    for r in run_world(W.cp_triton_worker, world, **kw):
        assert r["layer_out_err"] < 1e-5 and r["layer_grad_err"] < 1e-4


@pytest.mark.parametrize("recompute,loss_chunk", [("full", 0), ("keep_attention", 24)])
def test_data_parallel_on_top_of_cp(recompute, loss_chunk):
    """CP=2 x DP=2: shards summed, replicas averaged; recomputation repeats the K/V gather;
    a chunked loss (no full logits) sums over the CP ranks too."""
    for r in run_world(W.cp_dp_worker, 4, cp=2, recompute=recompute, loss_chunk=loss_chunk):
        assert r["grad_err"] < 1e-10


def test_zigzag_shards_partition_the_sequence():
    S, cp = 48, 3
    assert zigzag_chunks(S, cp, 0) == [(0, 8), (40, 48)]
    assert zigzag_chunks(S, cp, 2) == [(16, 24), (24, 32)]
    t = torch.arange(S)
    got = torch.cat([zigzag_shard(t, 0, cp, r) for r in range(cp)])
    assert sorted(got.tolist()) == list(range(S))
    # causal work (sum of query positions + 1) is the same on every rank
    work = [int((zigzag_shard(t, 0, cp, r) + 1).sum()) for r in range(cp)]
    assert len(set(work)) == 1
    assert torch.equal(gather_sequence(t[None], 1, None)[0], t)  # one rank: identity


def _gather_worker(rank, world):
    state = ParallelState(world, rank, cp=world)
    full = torch.arange(24, dtype=torch.float64).reshape(1, 24, 1).repeat(1, 1, 2)
    mine = zigzag_shard(full, 1, world, rank).clone().requires_grad_()
    back = gather_sequence(mine, 1, state.cp_group)
    assert torch.equal(back, full)
    (back * (rank + 1)).sum().backward()  # every rank's use of every token
    assert torch.equal(mine.grad, torch.full_like(mine, sum(range(1, world + 1))))
    return {}


def test_gather_sequence_restores_order_and_sums_gradients():
    run_world(_gather_worker, 3)


def test_bad_layouts_name_the_fix():
    cfg = W.tiny_config()
    with pytest.raises(ValueError, match="not divisible by tp\\*sp\\*cp"):
        ParallelConfig(cp=3).check_model(cfg, 4, 64)
    with pytest.raises(ValueError, match="2\\*cp = 4 equal chunks; use a multiple of 4, e.g. 64"):
        ParallelConfig(cp=2).check_model(cfg, 2, 62)
    with pytest.raises(ValueError, match="each rank's 22 tokens into 3 shards; use a multiple of 12, e.g. 48"):
        check_cp_seq_len(44, 2, sp=3)
    with pytest.raises(ValueError, match="cp=0"):
        ParallelConfig(cp=0)
    with pytest.raises(ValueError, match="NSA attention only"):
        ParallelConfig(cp=2).check_model(W.tiny_config(attention="dense"), 2, 64)
    from nsa_dist.training.build import check_cp_zero_stage
    with pytest.raises(ValueError, match="cp=2\\) with ZeRO-3 .* zero_optimization.stage 0, 1 or 2"):
        check_cp_zero_stage(2, str(ROOT / "configs/deepspeed/zero3.json"))
    check_cp_zero_stage(2, str(ROOT / "configs/deepspeed/zero1.json"))
    # no process group is touched: the checks are pure arithmetic
    assert not torch.distributed.is_initialized()


def test_state_groups_with_cp():
    from nsa_dist.parallel.state import check_layout
    L = check_layout(16, 2, 2, None, cp=2)  # tp, sp, cp, dp = 2, 2, 2, 2
    assert L.dp == 2 and L.rank_of(1, 0, 1, 1) == 1 + 2 * (0 + 2 * (1 + 2 * 1))
    assert L.cp_groups()[0] == [0, 4] and L.cp_coord(5) == 1
    assert L.seq_groups()[0] == [0, 2, 4, 6]
    assert L.dp_groups()[0] == [0, 8]
    assert L.sdp_groups()[0] == [0, 2, 4, 6, 8, 10, 12, 14]
    assert L.head_groups()[:2] == [[0, 2, 1, 3], [4, 6, 5, 7]]  # head-rank order: tp first
    st = ParallelState(16, 13, tp=2, sp=2, cp=2, create_groups=False)
    assert (st.tp_rank, st.sp_rank, st.cp_rank, st.dp_rank) == (1, 0, 1, 1)
    assert st.seq_ranks == [9, 11, 13, 15] and st.replica_size == 8


def test_resume_on_another_cp_degree_is_refused_naming_reshard():
    from nsa_dist.training.checkpoint import check_compatible
    model = W.tiny_config().to_dict()
    meta = {"tag": "step_00000002", "model_config": model, "seq_len": 64, "world_size": 2,
            "data_prefix": "/data", "train_config": {"parallel": {"tp": 1, "sp": 1, "cp": 2}}}
    assert check_compatible(meta, model, None, "/data", 64, 2, layout=(1, 1, 2)) == []
    with pytest.raises(ValueError, match=r"layout differs \(tp=1, sp=1, cp=2 in the checkpoint, "
                                         r"tp=2, sp=1, cp=1 now\).*nsa-convert reshard"):
        check_compatible(meta, model, None, "/data", 64, 2, layout=(2, 1, 1))

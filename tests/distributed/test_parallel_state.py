"""Rank layout, invalid layouts (clear errors at start-up), and the DeepSpeed mpu object."""
import copy

import pytest
import torch

import dist_workers as W
from dist_harness import run_world
from nsa_dist.parallel import (HeadLayout, Layout, ParallelState, check_layout, check_model_layout,
                               parallelize)
from nsa_dist.parallel.state import check_seq_len


def test_rank_order_tp_fastest_then_sp_then_dp():
    L = check_layout(8, 2, 2, None)
    assert L.dp == 2
    assert L.coords(5) == (1, 0, 1) and L.rank_of(1, 0, 1) == 5
    assert L.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert L.sp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert L.dp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert L.sdp_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # head-rank order tp_rank * sp + sp_rank; H = 2 over 4 head ranks: pairs share a KV head
    assert L.head_groups() == [[0, 2, 1, 3], [4, 6, 5, 7]]
    assert L.kv_share_groups(2) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert L.kv_share_groups(4) == []
    assert Layout(4, 4, 1, 1).tp_kv_share_groups(2) == [[0, 1], [2, 3]]


def test_head_layout_assigns_kv_heads_like_one_device():
    # HQ = 8, H = 2, tp = 2, sp = 2: head rank hr attends query heads 2hr, 2hr+1 -> KV head hr // 2
    starts = [HeadLayout(8, 2, 2, 2, t, s).kv_global_start for t in range(2) for s in range(2)]
    assert starts == [0, 0, 1, 1]
    L = HeadLayout(8, 2, 2, 2, 1, 0)
    assert (L.q_per_tp, L.q_start, L.kv_per_tp, L.kv_start, L.kv_repeat, L.q_local) == (4, 4, 1, 1, 2, 2)
    L = HeadLayout(4, 2, 4, 1, 3, 0)  # tp = 4 > H = 2: ranks 2, 3 replicate KV head 1
    assert (L.kv_start, L.kv_per_tp, L.kv_global_start) == (1, 1, 1)


@pytest.mark.parametrize("args, words", [
    ((6, 4, 1, None), ["world size 6", "tp*sp = 4*1 = 4", "divisors"]),
    ((8, 2, 2, 3), ["tp*sp*dp = 2*2*3 = 12", "dp=2"]),
    ((8, 0, 1, None), ["tp must be a positive integer"]),
])
def test_invalid_world_layouts(args, words):
    with pytest.raises(ValueError) as err:
        check_layout(*args)
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("kw, words", [
    (dict(num_heads=6, num_kv_heads=2, tp=4, sp=1), ["num_heads=6", "tp*sp = 4*1 = 4", "(2, 1)"]),
    (dict(num_heads=6, num_kv_heads=3, tp=2, sp=1), ["num_kv_heads=3", "tp=2", "(3, 1)"]),
    (dict(num_heads=6, num_kv_heads=2, tp=1, sp=3), ["2 KV head(s)", "sp=3"]),
    (dict(num_heads=4, num_kv_heads=2, tp=4, sp=1, vocab_size=10), ["vocab_size=10", "12"]),
    (dict(num_heads=4, num_kv_heads=2, tp=1, sp=2, seq_len=100 + 1), ["101", "multiple of 2"]),
])
def test_invalid_model_layouts(kw, words):
    with pytest.raises(ValueError) as err:
        check_model_layout(**kw)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_valid_model_layouts_pass():
    check_model_layout(num_heads=8, num_kv_heads=2, tp=2, sp=2)  # H_t = 1 < sp: replicate
    check_model_layout(num_heads=8, num_kv_heads=2, tp=8, sp=1)  # t > H
    check_model_layout(num_heads=8, num_kv_heads=8, tp=2, sp=4)  # whole groups everywhere
    check_seq_len(64, tp=2, sp=1, megatron_sp=True)
    with pytest.raises(ValueError, match="Megatron sequence parallel"):
        check_seq_len(63, tp=2, sp=1, megatron_sp=True)


def test_parallelize_errors_and_trivial_layout():
    model = W.build_model(W.tiny_config())
    state = ParallelState(2, 0, sp=2, create_groups=False)
    with pytest.raises(ValueError, match="megatron_sp=True needs sp=1"):
        parallelize(model, state, megatron_sp=True)
    with pytest.raises(ValueError, match="needs process groups"):
        parallelize(model, state)
    with pytest.raises(RuntimeError, match="init_process_group"):
        state.mpu()
    with pytest.raises(ValueError, match="rank must be in"):
        ParallelState(2, 2, tp=2, create_groups=False)
    # tp = sp = 1 (pure data parallel) needs no groups and is the model itself
    pm = parallelize(copy.deepcopy(model), ParallelState(1, 0, create_groups=False))
    with pytest.raises(ValueError, match="already parallelised"):
        parallelize(pm, ParallelState(1, 0, create_groups=False))
    ids = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pm(ids, ids).loss, model(ids, ids).loss)
    assert pm.num_parameters() == model.num_parameters() == pm.local_num_parameters()
    assert pm.flops_per_token(64) == model.flops_per_token(64)


def mpu_worker(rank, world):
    out = {}
    for tp, sp in ((2, 1), (2, 2), (1, 4)):
        mpu = ParallelState(world, rank, tp=tp, sp=sp).mpu()
        dist = torch.distributed
        out[f"{tp}x{sp}"] = dict(
            mp=(mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size(),
                dist.get_world_size(mpu.get_model_parallel_group())),
            dp=(mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size(),
                dist.get_world_size(mpu.get_data_parallel_group()), mpu.get_data_parallel_group_ranks()),
            sp=(mpu.get_sequence_parallel_rank(), mpu.get_sequence_parallel_world_size(),
                dist.get_world_size(mpu.get_sequence_parallel_group())),
            sdp=(mpu.get_sequence_data_parallel_rank(), mpu.get_sequence_data_parallel_world_size(),
                 dist.get_world_size(mpu.get_sequence_data_parallel_group())))
        # the group really contains the ranks the layout says: sum of ranks over TP
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=mpu.get_model_parallel_group())
        out[f"{tp}x{sp}"]["tp_rank_sum"] = float(t)
    return out


def test_mpu_groups_on_four_processes():
    res = run_world(mpu_worker, 4)
    r3 = res[3]  # rank 3 = (tp_rank 1, sp_rank 1, dp 0) in 2x2
    assert r3["2x1"]["mp"] == [1, 2, 2] and r3["2x1"]["dp"] == [1, 2, 2, [1, 3]]
    assert r3["2x1"]["tp_rank_sum"] == 2 + 3
    assert r3["2x2"]["sp"] == [1, 2, 2] and r3["2x2"]["dp"] == [0, 1, 1, [3]]
    assert r3["2x2"]["sdp"] == [1, 2, 2]
    assert r3["1x4"]["sp"] == [3, 4, 4] and r3["1x4"]["sdp"] == [3, 4, 4] and r3["1x4"]["mp"] == [0, 1, 1]


def test_parallel_config_keys_and_checks():
    from nsa_dist.parallel import ParallelConfig

    pc = ParallelConfig.from_dict({"tp": 2, "sp": 2})
    assert (pc.tp, pc.sp, pc.megatron_sp) == (2, 2, False)
    with pytest.raises(ValueError, match="unknown key 'tensor_parallel'"):
        ParallelConfig.from_dict({"tensor_parallel": 2})
    with pytest.raises(ValueError, match="megatron_sp=true needs sp=1"):
        ParallelConfig(tp=2, sp=2, megatron_sp=True)
    with pytest.raises(ValueError, match="selection_comm"):
        ParallelConfig(selection_comm="fast")
    cfg = W.tiny_config(num_heads=4, num_kv_heads=2)
    ParallelConfig(tp=2, sp=2).check_model(cfg, world_size=8, seq_len=64)
    with pytest.raises(ValueError, match="world size 6"):
        ParallelConfig(tp=4).check_model(cfg, world_size=6)
    with pytest.raises(ValueError, match="sequence length 65"):
        ParallelConfig(sp=2).check_model(cfg, world_size=2, seq_len=65)
    st = ParallelConfig(tp=2).build_state(4, 3) if not torch.distributed.is_initialized() else None
    assert st is not None and (st.tp_rank, st.dp_rank) == (1, 1)

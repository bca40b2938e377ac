"""DeepSpeed accepts ParallelState.mpu(): ZeRO-1 over the sequence-data-parallel group gives
the single-device update for TP=2 x Ulysses=2 (Ulysses gradients summed, not averaged), with
gradient clipping (the global norm counts TP shards once and replicas once)."""
import copy
import os

import pytest
import torch

import dist_workers as W
from dist_harness import run_world
from nsa_dist.parallel import ParallelState, gather_full, parallelize


def deepspeed_worker(rank, world, tp=2, sp=2, lr=1e-2, clip=0.5):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # this child process only: DeepSpeed's CPU path
    os.environ.setdefault("LOCAL_RANK", str(rank))
    import deepspeed

    state = ParallelState(world, rank, tp=tp, sp=sp)
    cfg = W.tiny_config(num_heads=8, num_kv_heads=2, tie=False)
    ref = W.build_model(cfg)
    pm = parallelize(copy.deepcopy(ref), state)  # in place: keep ref whole
    engine, _, _, _ = deepspeed.initialize(
        model=pm, model_parameters=pm.parameters(), mpu=state.mpu(),
        optimizer=torch.optim.SGD(pm.parameters(), lr=lr),
        config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
                "gradient_clipping": clip, "steps_per_print": 10**9,
                "zero_allow_untested_optimizer": True})
    assert engine.sequence_parallel_size == sp
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(5))
    labels = torch.roll(ids, -1, 1)
    loss = engine(ids, labels).loss
    engine.backward(loss)
    engine.step()

    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    ref_loss = ref(ids, labels).loss
    ref_loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
    assert norm > clip, "the test should clip"
    opt.step()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    got = gather_full(pm, state, "param")
    worst = 0.0
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
        worst = max(worst, float((got[name] - p.detach()).abs().max()))
    return {"max_param_err": worst}


@pytest.mark.slow
def test_deepspeed_zero1_tp2_ulysses2_matches_one_device():
    pytest.importorskip("deepspeed")
    results = run_world(deepspeed_worker, 4)
    assert all(r["max_param_err"] < 1e-4 for r in results)

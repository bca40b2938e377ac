"""nsa-convert reshard and ZeRO-3 consolidate on real training checkpoints (CPU, gloo).

A TP=2 ZeRO-2 run saves at step 3 and goes on to step 6 (the reference curve). Its step-3
checkpoint goes to a layout-free checkpoint two ways: directly (``reshard step3``) and through
``consolidate --optimizer`` then ``reshard``; both give the same files. From them:

- logits: the original TP=2 model (its DeepSpeed files loaded as they are), the resharded
  weights on one device and under TP=4 (> KV heads) agree to < 1e-6 (fp32);
- training: resumed on TP=1 (``--resume auto``), TP=4, Ulysses 2 and ZeRO-3, the runs continue the
  reference loss curve, because Adam's moments are cut for the new layout like the weights;
  with ``--reset-optimizer`` the curve departs.

A ZeRO-3 run over 2 data-parallel ranks consolidates to DeepSpeed's own ``zero_to_fp32``
result bit for bit, and its reshard resumes on one rank (grad_accum_steps=2: the same samples
and the same mean of two micro-batch means per step) on its curve.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import check, free_port, run_launcher, summary, train_yaml
from nsa_dist.checkpoint import load_full
from nsa_dist.convert.cli import main as convert
from nsa_dist.convert.io import load_consolidated
from nsa_dist.models import NSADecoderLM

ROOT = Path(__file__).parents[2]
ZERO2 = str(ROOT / "configs/deepspeed/zero2.json")
ZERO3 = str(ROOT / "configs/deepspeed/zero3.json")
COMMON = dict(train_steps=6, decay_steps=10, eval_batches=0, image_every=0, tensorboard=False, log_every=1)
STEP3 = "step_00000003"


def _launch(cfg, nproc, *args):
    return run_launcher("torchrun.sh", cfg, *args, launcher_args=("--nproc", str(nproc)))


def _curve(cfg):
    return dict((int(s), loss) for s, loss in summary(cfg)["loss_curve"])


def _assert_continues(got: dict, want: dict, tol: float) -> float:
    assert sorted(got) == [4, 5, 6], got
    err = max(abs(got[s] - want[s]) for s in got)
    assert err < tol, (got, want)
    return err


@pytest.fixture(scope="module")
def tp2_run(tiny_data, tmp_path_factory):
    """The TP=2 reference run and its step-3 checkpoint resharded both ways."""
    root = tmp_path_factory.mktemp("reshard")
    ref = train_yaml(tiny_data, root / "ref", deepspeed=ZERO2, save_every=3, parallel={"tp": 2}, **COMMON)
    check(_launch(ref, 2))
    step3 = root / "ref" / "run" / "checkpoints" / STEP3
    assert convert(["reshard", str(step3), str(root / "direct"), "--tp", "4", "--world-size", "4"]) == 0
    assert convert(["consolidate", str(step3), str(root / "cons_opt"), "--optimizer"]) == 0
    assert convert(["consolidate", str(step3), str(root / "cons")]) == 0
    # The consolidated route, written where --resume auto of a new run looks.
    assert convert(["reshard", str(root / "cons_opt"), str(root / "one" / "run" / "checkpoints")]) == 0
    return root, ref, step3


def test_reshard_routes_agree_and_keep_weights_and_moments(tp2_run):
    root, _, _ = tp2_run
    w_d, m1_d, m2_d = load_full(str(root / "direct" / STEP3))
    w_c, m1_c, m2_c = load_full(str(root / "one" / "run" / "checkpoints" / STEP3))
    for a, b in ((w_d, w_c), (m1_d, m1_c), (m2_d, m2_c)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, cons = load_consolidated(str(root / "cons"))  # the run's module weights
    assert set(w_d) <= set(cons) and all(torch.equal(w_d[k], cons[k]) for k in w_d)
    assert all(float(v.abs().sum()) > 0 for v in m2_d.values())  # real second moments
    for folder in (root / "direct" / STEP3, root / "one" / "run" / "checkpoints" / STEP3):
        meta = json.loads((folder / "nsa_meta.json").read_text())
        assert (meta["layout"], meta["optimizer"], meta["step"], meta["adam_step"]) == ("full", "adam", 3, 3)
        assert (meta["consumed_samples"], meta["global_batch"], meta["allow_batch_change"]) == (6, 2, False)


def _logits_worker(rank, world, port, cfg_dict, tp, source, ids, out):
    """TP=``tp`` model on ``world`` gloo ranks: weights from ``source`` (a DeepSpeed step folder,
    loaded file by file as saved, or a reshard folder); rank 0 writes the gathered logits."""
    from nsa_dist import ModelConfig
    from nsa_dist.convert.zero_state import load_ds_file
    from nsa_dist.parallel import ParallelState, parallelize
    from nsa_dist.checkpoint import load_weights

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = ModelConfig.from_dict(cfg_dict)
        state = ParallelState(world, rank, tp=tp)
        model = NSADecoderLM(cfg, backend="reference")
        model = parallelize(model, state) if tp > 1 else model
        if os.path.isfile(os.path.join(source, "nsa_meta.json")) and "model.safetensors" in os.listdir(source):
            load_weights(model, source, cfg.tie_embeddings)
        else:
            sd = load_ds_file(os.path.join(source, f"mp_rank_{state.tp_rank:02d}_model_states.pt"))["module"]
            model.load_state_dict(sd)
        with torch.no_grad():
            logits = model.eval()(ids).logits  # [1, S, V / tp]: vocab-parallel
        if tp > 1:
            parts = [torch.empty_like(logits) for _ in range(tp)]
            dist.all_gather(parts, logits.contiguous(), group=state.tp_group)
            logits = torch.cat(parts, -1)
        if rank == 0:
            torch.save(logits, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _logits(cfg, tp, source, ids) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "logits.pt")
        mp.start_processes(_logits_worker, args=(tp, free_port(), cfg.to_dict(), tp, str(source), ids, out),
                           nprocs=tp, join=True, start_method="fork")
        return torch.load(out, weights_only=True)


def test_resharded_logits_on_tp1_and_tp4_equal_the_original_tp2_model(tp2_run):
    root, _, step3 = tp2_run
    cfg, cons = load_consolidated(str(root / "cons"))
    ids = torch.randint(0, cfg.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    original = _logits(cfg, 2, step3, ids)  # the TP=2 ranks' own files, no conversion code
    ref = NSADecoderLM(cfg, backend="reference").eval()
    ref.load_state_dict(cons, strict=False)
    with torch.no_grad():
        consolidated = ref(ids).logits
    one = _logits(cfg, 1, root / "direct" / STEP3, ids)
    four = _logits(cfg, 4, root / "direct" / STEP3, ids)
    errs = {k: float((v - original).abs().max()) for k, v in
            (("consolidated", consolidated), ("tp1", one), ("tp4", four))}
    print("max |logits - original TP=2 logits|:", errs, "max |logit|:", float(original.abs().max()))
    assert torch.equal(one, consolidated)
    assert all(e < 1e-6 for e in errs.values()), errs


def test_resume_on_tp1_with_resume_auto_continues_the_curve(tiny_data, tp2_run):
    root, ref, _ = tp2_run
    one = train_yaml(tiny_data, root / "one", deepspeed=ZERO2, **COMMON)
    proc = _launch(one, 1, "--resume", "auto")
    check(proc)
    assert "weights and Adam state cut for this layout (tp=1" in proc.stdout + proc.stderr
    err = _assert_continues(_curve(one), _curve(ref), 1e-5)
    print(f"TP=1 resume: max |loss - reference| {err:.2e}")


def _rename_checkpoint(src: Path, dst: Path) -> int:
    """A copy of DeepSpeed checkpoint ``src`` whose parameters carry other local names (as the
    twin parallel classes' checkpoints did, e.g. ``layers.0.attn.gate_fc1_w``): the model
    files' keys and shapes, the record's keys (each still naming its full parameter and
    slice), the recorded file sizes. Returns how many names changed."""
    from nsa_dist.convert.zero_state import load_ds_file

    shutil.copytree(src, dst)
    meta = json.loads((dst / "nsa_meta.json").read_text())
    changed = 0
    for tp_rank, record in enumerate(meta["param_layout"]):
        names = {local: "legacy_" + local.replace(".", "_") for local in record}
        changed += sum(a != b for a, b in names.items())
        f = dst / f"mp_rank_{tp_rank:02d}_model_states.pt"
        sd = load_ds_file(str(f))
        sd["module"] = {names.get(k, k): v for k, v in sd["module"].items()}
        sd["param_shapes"] = [{names[k]: v for k, v in group.items()} for group in sd["param_shapes"]]
        torch.save(sd, f)
        meta["param_layout"][tp_rank] = {names[k]: v for k, v in record.items()}
    meta["files"] = {k: (dst / k).stat().st_size for k in meta["files"]}
    from nsa_dist.checkpoint.files import sha256_file  # the manifest's checksums follow the edits
    meta["sha256"] = {k: sha256_file(str(dst / k)) for k in meta["files"]}
    (dst / "nsa_meta.json").write_text(json.dumps(meta))
    return changed


def test_tp2_checkpoint_with_other_names_resumes_exactly_and_consolidates(tiny_data, tp2_run):
    """A DeepSpeed checkpoint whose layout record names the parameters otherwise than the live
    model loads through the record (renamed module state, optimizer in the record's order):
    the TP=2 run continues its curve exactly; consolidate reads it to the same tensors."""
    from nsa_dist.convert.zero_state import load_ds_file

    root, ref, step3 = tp2_run
    meta = json.loads((step3 / "nsa_meta.json").read_text())
    for tp_rank, record in enumerate(meta["param_layout"]):  # the order DeepSpeed's groups hold
        groups = load_ds_file(str(step3 / f"mp_rank_{tp_rank:02d}_model_states.pt"))["param_shapes"]
        assert list(record) == [n for g in groups for n in g], tp_rank
    renamed = root / "renamed" / STEP3
    assert _rename_checkpoint(step3, renamed) > 0
    cfg = train_yaml(tiny_data, root / "renamed_run", deepspeed=ZERO2, parallel={"tp": 2}, **COMMON)
    proc = _launch(cfg, 2, "--resume", str(renamed))
    check(proc)
    assert "parameter names mapped to this model's through the checkpoint's param_layout" in proc.stdout
    got, want = _curve(cfg), _curve(ref)
    assert sorted(got) == [4, 5, 6] and all(got[s] == want[s] for s in got), (got, want)
    assert convert(["consolidate", str(renamed), str(root / "renamed_cons"), "--optimizer"]) == 0
    for name in ("model.safetensors", "optimizer.safetensors"):
        from safetensors.torch import load_file
        a, b = load_file(str(root / "cons_opt" / name)), load_file(str(root / "renamed_cons" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# TP=4 (4 ranks on the CI's 2 cores) with `-m slow`: by default the TP=4 cut of the weights is
# checked by the logits test above (the same local_slices cut Adam's moments), and resumes
# with the moments run on TP=1, Ulysses 2 and ZeRO-3
@pytest.mark.parametrize("name,parallel,nproc", [pytest.param("TP=4", {"tp": 4}, 4, marks=pytest.mark.slow),
                                                 ("Ulysses sp=2", {"sp": 2}, 2)])
def test_resume_on_another_split_continues_the_curve(tiny_data, tp2_run, name, parallel, nproc):
    root, ref, _ = tp2_run
    cfg = train_yaml(tiny_data, root / name.split()[0].replace("=", ""), deepspeed=ZERO2, parallel=parallel, **COMMON)
    check(_launch(cfg, nproc, "--resume", str(root / "direct")))
    err = _assert_continues(_curve(cfg), _curve(ref), 1e-5)
    print(f"{name} resume: max |loss - reference| {err:.2e}")


def test_resume_on_zero3_continues_the_curve_and_reset_departs(tiny_data, tp2_run):
    root, ref, step3 = tp2_run
    want = _curve(ref)
    z3 = train_yaml(tiny_data, root / "z3", deepspeed=ZERO3, **COMMON)
    check(_launch(z3, 1, "--resume", str(root / "direct")))
    err = _assert_continues(_curve(z3), want, 1e-5)
    print(f"ZeRO-3 resume: max |loss - reference| {err:.2e}")
    # Without the optimizer state the same weights train differently after one step.
    assert convert(["reshard", str(step3), str(root / "reset"), "--reset-optimizer"]) == 0
    assert json.loads((root / "reset" / STEP3 / "nsa_meta.json").read_text())["optimizer"] == "reset"
    reset = train_yaml(tiny_data, root / "reset_run", deepspeed=ZERO2, **COMMON)
    proc = _launch(reset, 1, "--resume", str(root / "reset"))
    check(proc)
    assert "optimizer state was RESET" in proc.stdout + proc.stderr
    got = _curve(reset)
    assert abs(got[4] - want[4]) < 1e-5  # same weights
    assert abs(got[6] - want[6]) > 1e-4  # Adam started afresh


@pytest.mark.slow  # 14 s; the default run keeps the foreign layout / model refusals (15-min budget)
def test_global_batch_change_needs_the_flag(tiny_data, tp2_run, tmp_path):
    root, _, step3 = tp2_run
    small = train_yaml(tiny_data, tmp_path / "small", deepspeed=ZERO2, micro_batch_size=1, **COMMON)
    proc = _launch(small, 1, "--resume", str(root / "direct"))
    assert proc.returncode != 0 and "global batch of 2 samples, this run has 1" in proc.stderr
    assert "--allow-batch-change" in proc.stderr
    assert convert(["reshard", str(step3), str(tmp_path / "allowed"), "--allow-batch-change"]) == 0
    proc = _launch(small, 1, "--resume", str(tmp_path / "allowed"), "train_steps=4")
    check(proc)
    assert "global batch 2 -> 1 samples" in proc.stdout + proc.stderr
    s = summary(small)
    assert s["steps"] == 4 and s["tokens_seen"] == (6 + 1) * 128  # 3 steps of 2 samples, then 1 of 1


def _model_yaml(tiny_data):
    import yaml
    return yaml.safe_load(Path(tiny_data["model"]).read_text())


def test_reshard_bad_input_is_refused(tiny_data, tp2_run, tmp_path, capsys):
    root, _, step3 = tp2_run

    def refused(args, *words):
        assert convert(args) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err
        assert not Path(args[2]).exists()

    # layouts the model cannot take, named before anything is written
    refused(["reshard", str(step3), str(tmp_path / "x"), "--tp", "3"], "not divisible by tp*sp")
    refused(["reshard", str(step3), str(tmp_path / "x"), "--tp", "4", "--world-size", "6"], "world size 6 is not divisible")
    # an existing output is kept unless --force
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "f").write_text("mine")
    assert convert(["reshard", str(step3), str(tmp_path / "keep")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "keep" / "f").read_text() == "mine"
    # a consolidated model without optimizer state: the reset must be asked for
    refused(["reshard", str(root / "cons"), str(tmp_path / "y")], "--reset-optimizer", "consolidate --optimizer")
    # a consolidated directory whose config does not match its tensors
    bad_cfg = tmp_path / "bad_cfg"
    shutil.copytree(root / "cons_opt", bad_cfg)
    info = json.loads((bad_cfg / "config.json").read_text())
    info["nsa_dist_model"]["intermediate_size"] = 192
    (bad_cfg / "config.json").write_text(json.dumps(info))
    refused(["reshard", str(bad_cfg), str(tmp_path / "y")], "mlp", "config says")
    # a truncated optimizer file of a consolidated directory, a truncated ZeRO shard
    trunc = tmp_path / "trunc_cons"
    shutil.copytree(root / "cons_opt", trunc)
    opt = trunc / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:3000])
    refused(["reshard", str(trunc), str(tmp_path / "y")], "truncated")
    bad_src = tmp_path / "trunc"
    shutil.copytree(step3, bad_src)
    shard = bad_src / "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:2000])
    refused(["reshard", str(bad_src), str(tmp_path / "z")], "truncated")
    assert (step3 / "zero_pp_rank_0_mp_rank_01_optim_states.pt").stat().st_size > 2000  # source untouched


def test_resume_refuses_a_foreign_layout_or_model(tiny_data, tp2_run, tmp_path):
    root, _, step3 = tp2_run
    # A DeepSpeed checkpoint on another layout without reshard names the fix: another world
    # size, and the same world size with another split (TP=2 -> Ulysses 2).
    other = train_yaml(tiny_data, tmp_path / "other", deepspeed=ZERO2, **COMMON)
    proc = _launch(other, 1, "--resume", str(step3))
    assert proc.returncode != 0 and "nsa-convert reshard" in proc.stderr
    uly = train_yaml(tiny_data, tmp_path / "uly", deepspeed=ZERO2, parallel={"sp": 2}, **COMMON)
    proc = _launch(uly, 2, "--resume", str(step3))
    assert proc.returncode != 0 and "layout differs (tp=2, sp=1 in the checkpoint, tp=1, sp=2 now)" in proc.stderr
    # another model config cannot load the resharded weights
    wide = _model_yaml(tiny_data)
    wide["hidden_size"] = 96
    (tmp_path / "wide.yaml").write_text(json.dumps(wide))
    bad = train_yaml(tiny_data, tmp_path / "bad", deepspeed=ZERO2, model=str(tmp_path / "wide.yaml"), **COMMON)
    proc = _launch(bad, 1, "--resume", str(root / "direct"))
    assert proc.returncode != 0 and "model config differs" in proc.stderr
    # a truncated resharded file is found before anything is built
    trunc = tmp_path / "trunc_full"
    shutil.copytree(root / "direct", trunc)
    w = trunc / STEP3 / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    proc = _launch(other, 1, "--resume", str(trunc))
    assert proc.returncode != 0 and "truncated" in proc.stderr


@pytest.fixture(scope="module")
def z3_run(tiny_data, tmp_path_factory):
    """ZeRO-3 over 2 data-parallel ranks, saved at step 3 and at the end (step 6)."""
    root = tmp_path_factory.mktemp("zero3")
    cfg = train_yaml(tiny_data, root / "z3", deepspeed=ZERO3, save_every=3, **COMMON)
    check(_launch(cfg, 2))
    return root, cfg


def test_zero3_consolidate_equals_deepspeed_zero_to_fp32(z3_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, cfg = z3_run
    ckpt = Path(summary(cfg)["checkpoint"])
    assert convert(["consolidate", str(ckpt), str(root / "c")]) == 0
    _, ours = load_consolidated(str(root / "c"))
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    assert set(ours) <= set(theirs) and len(ours) >= len(theirs) - 1  # tied lm_head stored once
    for k, v in ours.items():
        assert torch.equal(v, theirs[k].contiguous().float()), k


def test_zero3_reshard_resumes_on_one_rank(tiny_data, z3_run):
    """ZeRO-3's Adam moments, read from its flat shards, continue its curve on one ZeRO-1
    rank with grad_accum_steps=2 (the two micro-batches of the two DP ranks)."""
    root, cfg = z3_run
    step3 = Path(summary(cfg)["checkpoint"]).parent / STEP3
    assert convert(["reshard", str(step3), str(root / "full")]) == 0
    one = train_yaml(tiny_data, root / "one", deepspeed=str(ROOT / "configs/deepspeed/zero1.json"),
                     grad_accum_steps=2, **COMMON)
    check(_launch(one, 1, "--resume", str(root / "full")))
    err = _assert_continues(_curve(one), _curve(cfg), 1e-5)
    print(f"ZeRO-3 DP=2 -> ZeRO-1 gas=2 resume: max |loss - reference| {err:.2e}")


def test_zero3_with_tensor_parallel_is_refused_clearly(tiny_data, tmp_path):
    cfg = train_yaml(tiny_data, tmp_path / "z3tp", deepspeed=ZERO3, parallel={"tp": 2}, **COMMON)
    proc = _launch(cfg, 2)
    assert proc.returncode != 0 and "ZeRO-3" in proc.stderr and "not supported" in proc.stderr
    assert not (tmp_path / "z3tp" / "run" / "checkpoints").exists()

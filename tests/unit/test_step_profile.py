"""The step profile's attribution of work to model parts (CPU: each op's own time stands in
for a kernel's)."""
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from nsa_dist.config import ModelConfig
from nsa_dist.models import NSADecoderLM
from nsa_dist.training.step_profile import PREFIX, ROWS, attribute, format_table, format_top, part_ranges

CFG = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
           intermediate_size=64, max_seq_len=128, attention="nsa",
           nsa={"cmp_block": 8, "cmp_stride": 4, "sel_block": 16, "num_selected": 3, "window": 16})


def _profile(backward: bool):
    torch.manual_seed(0)
    model = NSADecoderLM(ModelConfig.from_dict(CFG), backend="reference")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (1, 64))
    with profile(activities=[ProfilerActivity.CPU]) as prof, part_ranges(model):
        loss = model(ids, labels=ids).loss
        if backward:
            loss.backward()
            with record_function(PREFIX + "optimizer"):
                opt.step()
    return attribute(prof.events(), set(), steps=1, step_ms=1e6, data_ms=0.5)


def test_every_part_is_charged_and_backward_follows_its_forward():
    fwd, both = _profile(False), _profile(True)
    for row in ("attention projections", "attention other", "MLP", "norms", "embedding, LM head, loss"):
        assert fwd.rows.get(row, 0) > 0, (row, fwd.rows)
        # the backward ops (autograd thread, outside the forward ranges) land in the same rows
        assert both.counts[row] > fwd.counts[row], (row, fwd.counts[row], both.counts[row])
    assert fwd.rows.get("optimizer", 0) == 0 < both.rows["optimizer"]
    assert both.rows["data"] == 0.5
    charged = sum(both.rows.get(r, 0) for r in ROWS if r not in ("GPU idle", "data"))
    assert abs(charged - both.kernel_ms) < 1e-6 * max(1.0, both.kernel_ms)
    # most of the work is inside a named part, not "other"
    assert both.rows.get("other GPU work", 0) < 0.5 * both.kernel_ms
    table = format_table({"nsa 64": both})
    assert "attention projections" in table and "nsa 64" in table and "launches per step" in table
    # the top list accounts for every launch of its rows
    assert abs(sum(n for n, _ in both.top.values()) - both.launches) < 1e-6
    top = format_top({"nsa 64": both}, 5).splitlines()
    assert top[0].startswith("[nsa 64]") and len(top) == 6
    by_time = format_top({"nsa 64": both}, 3, by="time").splitlines()[1:]
    ms = [float(line.split(" x ")[1].split("ms")[0]) for line in by_time]
    assert len(ms) == 3 and ms == sorted(ms, reverse=True)


def test_hooks_are_removed():
    model = NSADecoderLM(ModelConfig.from_dict(CFG), backend="reference")
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with part_ranges(model):
        pass
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == before


def test_the_command_profiles_real_trainer_steps(tmp_path, monkeypatch, capsys):
    """``python -m nsa_dist.training.step_profile``: a Trainer per point (DeepSpeed on the CPU),
    one CSV row with every part; ``--step-times`` prints each timed step first."""
    import csv
    import os

    from nsa_dist.training.step_profile import main

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    model = tmp_path / "model.yaml"
    model.write_text("\n".join(f"{k}: {v}" for k, v in CFG.items() if k != "nsa")
                     + "\nnsa: {cmp_block: 8, cmp_stride: 4, sel_block: 16, num_selected: 3, window: 16}\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "profile.csv"
    assert main(["--config", os.path.join(root, "configs/train/bench_1b.yaml"), "--seq-len", "64",
                 "--attention", "nsa", "--warmup", "0", "--steps", "1", "--out", str(out), "--step-times", "2",
                 f"model={model}", "precision=fp32", f"output_dir={tmp_path / 'run'}"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[steps] nsa 64 ")]
    assert [ln.split()[3] for ln in lines] == ["step=0", "step=1"]
    assert all(float(ln.split("wall_ms=")[1].split()[0]) > 0 for ln in lines)
    (row,) = list(csv.DictReader(out.open()))
    assert row["point"] == "nsa 64" and float(row["step_ms"]) > 0
    assert float(row["attention projections"]) > 0 and float(row["MLP"]) > 0 and float(row["optimizer"]) > 0


def test_selective_recomputation_is_charged_to_the_attention():
    """keep_attention calls the layer's prepare / attend / finish, not its forward."""
    torch.manual_seed(0)
    model = NSADecoderLM(ModelConfig.from_dict({**CFG, "recompute": "keep_attention"}), backend="reference")
    model.gradient_checkpointing = True
    ids = torch.randint(0, 128, (1, 64))
    with profile(activities=[ProfilerActivity.CPU]) as prof, part_ranges(model):
        model(ids, labels=ids).loss.backward()
    p = attribute(prof.events(), set(), steps=1, step_ms=1e6)
    assert p.counts["attention projections"] > 0 and p.counts["attention other"] > 0, p.counts
    assert not any("prepare" in vars(m) for m in model.modules())  # the wrappers are gone


def test_gpu_idle_is_charged_to_the_kernel_that_ends_the_gap():
    """Device spans: each gap (no stream busy) goes to the row of the op that launched the
    kernel after it; overlapping streams leave no gap."""
    from types import SimpleNamespace as NS

    from nsa_dist.training.step_profile import _idle_before

    def op(i, part):
        return NS(id=i, name="aten::mm", cpu_parent=NS(name=PREFIX + part, cpu_parent=None), kernels=[1])

    events = [op(1, "mlp"), op(2, "attention"), op(3, "optimizer"), op(4, "attention"),
              NS(id=5, name="cudaLaunchKernel", cpu_parent=None, kernels=[])]
    spans = [(0, 100, "gemm_kernel", 1), (400, 500, "elementwise", 2),  # 300 us before attention other
             (450, 900, "gemm_kernel", 3),  # overlaps the last: no gap
             (1900, 2000, "gemm_kernel", 4)]  # 1000 us before attention projections
    idle = _idle_before(spans[::-1], events, {}, set())
    assert idle == {"attention other": 0.3, "attention projections": 1.0}, idle
    assert _idle_before([], events, {}, set()) == {}


def test_device_spans_leave_out_record_function_ranges():
    """``record_function`` ranges appear on the GPU timeline too ("gpu_user_annotation"): they
    are not device work, and counted as work they covered the idle time (the 32k profiles of
    2026-12-06 showed 0 ms idle and 800 ms of "other GPU work")."""
    from types import SimpleNamespace as NS

    import torch

    from nsa_dist.training.step_profile import device_spans

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, device, kind, annotation=None):
        k = NS(name=lambda: name, device_type=lambda: device, activity_type=lambda: kind,
               start_ns=lambda: 1000, duration_ns=lambda: 2000, linked_correlation_id=lambda: 7)
        if annotation is not None:
            k.is_user_annotation = lambda: annotation
        return k
    events = [ev("_range_fwd", cuda, "kernel", False), ev(PREFIX + "attention", cuda, "gpu_user_annotation", True),
              ev(PREFIX + "mlp", cuda, "gpu_user_annotation"),  # an older torch: only the activity type
              ev("Memcpy DtoD", cuda, "gpu_memcpy"), ev("aten::mm", cpu, "cpu_op", False)]
    prof = NS(profiler=NS(kineto_results=NS(events=lambda: events)))
    assert device_spans(prof) == [(1.0, 3.0, "_range_fwd", 7), (1.0, 3.0, "Memcpy DtoD", 7)]


def test_memory_peak_lists_what_is_live_at_the_highest_point():
    from nsa_dist.training.step_profile import peak_allocations

    def fr(path, line):
        return [{"filename": "/usr/lib/torch/functional.py", "line": 1, "name": "linear"},
                {"filename": path, "line": line, "name": "f"}]

    trace = [dict(action="alloc", addr=1, size=100, frames=fr("/x/nsa_dist/modules/attention.py", 10)),
             dict(action="alloc", addr=2, size=300, frames=fr("/x/kernels/nsa.py", 20)),
             dict(action="alloc", addr=3, size=50, frames=fr("/x/kernels/nsa.py", 20)),
             dict(action="free_completed", addr=2, size=300, frames=[]),  # peak (450) was before this
             dict(action="alloc", addr=4, size=200, frames=fr("/x/nsa_dist/modules/attention.py", 10))]
    peak, ranked = peak_allocations(trace)
    assert peak == 450
    assert ranked == [("kernels/nsa.py:20 f", 350, 2), ("nsa_dist/modules/attention.py:10 f", 100, 1)]


def test_kernels_without_an_op_are_charged_by_name_not_counted_idle():
    """A device span that no op's kernels account for (a Triton launch outside any op) is
    charged by its kernel's name; only the rest of the step is GPU idle."""
    from types import SimpleNamespace as NS

    gemm = NS(name="gemm_kernel", duration=100.0)
    op = NS(id=1, name="aten::mm", cpu_parent=NS(name=PREFIX + "mlp", cpu_parent=None), kernels=[gemm],
            sequence_nr=-1, thread=0, fwd_thread=0)
    spans = [(0, 100, "gemm_kernel", 1), (200, 260, "_select_topn", 0), (300, 340, "_select_topn", 0)]
    p = attribute([op], {"_select_topn"}, steps=1, step_ms=1.0, spans=spans)
    assert p.rows["MLP"] == 0.1 and abs(p.rows["attention kernels"] - 0.1) < 1e-9
    assert abs(p.rows["GPU idle"] - 0.8) < 1e-9 and p.launches == 3
    assert p.top[("attention kernels", "_select_topn <- (no op)")] == (2, 0.1)
    # without spans (a CPU run) nothing is added
    assert "attention kernels" not in attribute([op], {"_select_topn"}, steps=1, step_ms=1.0).rows

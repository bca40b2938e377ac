"""Training throughput over a grid of (context, layout, attention), in one launch.

    launch/deepspeed.sh --entry nsa_dist.training.bench configs/train/bench_1b.yaml \\
        --seq-len 8192,32768 --layouts dp,tp2,tp4,sp4,tp2sp2 --attention nsa,dense \\
        --out runs/bench/throughput.csv [key=value train-config overrides]

Every grid point is a real ``Trainer`` run (model, DeepSpeed engine, loader, optimizer
steps) with the train YAML plus: ``seq_len``, ``parallel.tp/sp``, ``micro_batch_size`` and a
model YAML derived from the config's with ``attention`` (and ``max_seq_len`` when the context
is longer) replaced. Dense and NSA therefore share the projections, MLPs, loss, optimizer and
layout code; only the attention differs. Throughput is the trainer's steady-state figure
(all steps after the first). Rank 0 appends one CSV row per point as soon as it is measured,
so a later failure loses nothing already done.

Layouts: ``dp`` (all ranks data parallel), ``tpN``, ``spN`` (Ulysses), ``tpNspM``; the data
parallel size is what remains of the world. A ``:mbK`` suffix sets the micro-batch (e.g.
``tp4:mb4`` for TP weak scaling: per-GPU work equal to one GPU at micro-batch 1).
"""
from __future__ import annotations

import argparse
import csv
import gc
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Optional

FIELDS = ["attention", "seq_len", "layout", "tp", "sp", "dp", "micro_batch_size", "gpus", "status",
          "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "seconds_per_step", "peak_memory_gb",
          "activation_checkpointing", "recompute", "steps", "device", "date", "model"]
_LAYOUT = re.compile(r"^(?:dp|(?:tp(\d+))?(?:sp(\d+))?)(?::mb(\d+))?$")


@dataclass(frozen=True)
class Layout:
    name: str
    tp: int
    sp: int
    micro_batch: Optional[int]  # None: the train config's


def parse_layout(spec: str) -> Layout:
    """``dp`` | ``tp2`` | ``sp4`` | ``tp2sp2``, optionally ``:mb4``."""
    m = _LAYOUT.match(spec.strip())
    if not m or spec.strip() in ("", ":"):
        raise ValueError(f"layout {spec!r}: expected dp, tpN, spN or tpNspM, optionally with :mbK "
                         f"(e.g. tp2sp2, tp4:mb4)")
    tp, sp, mb = (int(g) if g else None for g in m.groups())
    if 0 in (tp, sp, mb):
        raise ValueError(f"layout {spec!r}: sizes must be >= 1")
    return Layout(spec.strip(), tp or 1, sp or 1, mb)


def _csv_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(float(v)) if "k" not in v else int(v.rstrip("k")) * 1024
                  for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{what} {text!r}: expected comma-separated integers (8192 or 8k)") from None
    if not values or min(values) < 1:
        raise ValueError(f"--{what} {text!r}: expected positive integers")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nsa-bench-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="YAML", help="train config (mock_data recommended)")
    p.add_argument("--seq-len", default="8192", help="contexts, e.g. 8k,32k,65536")
    p.add_argument("--layouts", default="dp", help="comma-separated: dp, tpN, spN, tpNspM[:mbK]")
    p.add_argument("--attention", default="nsa,dense", help="nsa, dense or both")
    p.add_argument("--out", required=True, help="CSV to append rows to (created with a header)")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="start no new grid point after this many minutes (0: no limit)")
    p.add_argument("--stop-on-oom", action="store_true",
                   help="after an out-of-memory point, skip longer contexts of the same layout/attention")
    p.add_argument("--timeout-minutes", type=float, default=10.0,
                   help="collective timeout: a rank lost to an error ends the job after this long")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="train config overrides")
    return p


def _derived_model_yaml(base, attention: str, seq_len: int, out_dir: str) -> str:
    """The model YAML of train config ``base`` (with its ``model_overrides``) with ``attention``
    and (if needed) ``max_seq_len`` replaced; runs name it with ``model_overrides={}``."""
    from ..config import ModelConfig

    base_path = base.model
    cfg = base.model_config().to_dict()
    cfg["attention"] = attention
    cfg["max_seq_len"] = max(int(cfg["max_seq_len"]), seq_len)
    ModelConfig.from_dict(cfg, where=base_path)  # validate before anyone reads it
    tag = ""
    if base.model_overrides:  # runs with other overrides in the same folder keep their own file
        import hashlib
        import json

        tag = "_" + hashlib.sha1(json.dumps(base.model_overrides, sort_keys=True).encode()).hexdigest()[:8]
    name = f"{os.path.splitext(os.path.basename(base_path))[0]}_{attention}_{cfg['max_seq_len']}{tag}.yaml"
    os.makedirs(os.path.join(out_dir, "models"), exist_ok=True)
    path = os.path.join(out_dir, "models", name)
    import yaml

    from ..fileio import atomic_open

    with atomic_open(path) as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    return path


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _model_label(cfg) -> str:
    """The model column: the model YAML's name and the run's model overrides, if any."""
    label = os.path.basename(cfg.model)

    def flat(d, prefix="model."):
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}={v}"]
    return " ".join([label, *flat(cfg.model_overrides)])


def _append_row(path: str, row: dict) -> None:
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    fields = FIELDS
    if not new:  # a CSV begun by an older version keeps its own columns
        with open(path, newline="") as fh:
            fields = next(csv.reader(fh), None) or FIELDS
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in fields})
        fh.flush()
        os.fsync(fh.fileno())


def _fmt(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def run_grid(args) -> list[dict]:
    import torch
    import torch.distributed as dist

    from .config import TrainConfig
    from .build import import_deepspeed, init_distributed
    from .trainer import Trainer

    base = TrainConfig.from_yaml(args.config).apply_overrides(args.overrides)
    seqs = _csv_ints(args.seq_len, "seq-len")
    layouts = [parse_layout(s) for s in args.layouts.split(",") if s.strip()]
    attentions = [a.strip() for a in args.attention.split(",") if a.strip()]
    for a in attentions:
        if a not in ("nsa", "dense"):
            raise ValueError(f"--attention {a!r}: must be nsa or dense")
    deepspeed = import_deepspeed()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        # A lost rank (e.g. out of memory inside a collective) fails the job in minutes, not 30.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        timeout_s = 60 * args.timeout_minutes if args.timeout_minutes else None
        init_distributed(deepspeed, "cuda" if cuda else "cpu", timeout_s=timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    dist.barrier()
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    start, rows, states, oom_after = time.perf_counter(), [], {}, {}
    model = _model_label(base)
    for lay in layouts:  # layout outermost: each process-group layout is set up once
        for S in seqs:
            for attention in attentions:
                if args.max_minutes and time.perf_counter() - start > 60 * args.max_minutes:
                    if rank == 0:
                        print(f"[bench] --max-minutes {args.max_minutes} reached; stopping", flush=True)
                    return rows
                row = {"attention": attention, "model": model, "seq_len": S, "layout": lay.name, "tp": lay.tp,
                       "sp": lay.sp, "dp": world // (lay.tp * lay.sp) if world % (lay.tp * lay.sp) == 0 else "",
                       "gpus": world, "device": device_name, "date": time.strftime("%Y-%m-%d"),
                       "activation_checkpointing": base.activation_checkpointing}
                if (lay, attention) in oom_after:
                    row["status"] = f"skipped (out of memory at {oom_after[(lay, attention)]})"
                    rows.append(row)
                    if rank == 0:
                        _append_row(args.out, row)
                    continue
                row.update(_run_point(base, args, lay, attention, S, out_dir, states, Trainer, world, rank))
                if row["status"] == "oom" and args.stop_on_oom:  # longer contexts come later
                    oom_after[(lay, attention)] = S
                rows.append(row)
                if rank == 0:
                    _append_row(args.out, row)
                    print(f"[bench] {attention:<5} S={S:<7} {lay.name:<10} {row['status']:<8} "
                          f"{_fmt(row.get('tokens_per_s_per_gpu'), ',.0f')} tok/s/GPU  "
                          f"{_fmt(row.get('tflops_per_gpu'), '.1f')} TFLOP/s  "
                          f"{_fmt(row.get('peak_memory_gb'), '.1f')} GB  {row.get('recompute', '')}", flush=True)
    return rows


def _run_point(base, args, lay: Layout, attention: str, S: int, out_dir: str, states: dict,
               Trainer, world: int, rank: int) -> dict:
    import torch
    import torch.distributed as dist

    mb = lay.micro_batch or base.micro_batch_size
    model_yaml = None
    if rank == 0:
        model_yaml = _derived_model_yaml(base, attention, S, out_dir)
    holder = [model_yaml]
    dist.broadcast_object_list(holder, src=0)
    cfg = base.apply_overrides([f"seq_len={S}", f"parallel.tp={lay.tp}", f"parallel.sp={lay.sp}",
                                f"micro_batch_size={mb}", f"model={holder[0]}", "model_overrides={}",
                                f"output_dir={os.path.join(out_dir, 'runs', f'{attention}_{S}_{lay.name}'.replace(':', '_'))}"])
    try:
        cfg.parallel.check_model(cfg.model_config(), world, S)
    except ValueError as err:
        return {"status": f"invalid: {err}"}
    ps = None
    if lay.tp * lay.sp > 1:  # process groups are made once per layout and reused
        if (lay.tp, lay.sp) not in states:
            states[(lay.tp, lay.sp)] = cfg.parallel.build_state(world, rank)
        ps = states[(lay.tp, lay.sp)]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer, status, summary, recompute = None, "ok", {}, ""
    # DeepSpeed keeps the last engine's mpu in a module global and would take its data-parallel
    # group for a later engine built without one.
    from deepspeed.utils import groups as ds_groups
    ds_groups.mpu = None
    try:
        trainer = Trainer(cfg, parallel_state=ps)
        summary = trainer.train()
        from ..models.decoder import recompute_summary
        recompute = recompute_summary(trainer.engine.module)
    except Exception as err:  # noqa: BLE001 - recorded in the row, the grid goes on
        if not _is_oom(err):
            raise
        status = "oom"
        print(f"[bench] rank {rank}: out of memory at {attention} S={S} {lay.name}: "
              f"{str(err).splitlines()[0][:300]}", flush=True)
    finally:
        if trainer is not None:
            trainer.close()
            engine = getattr(trainer, "engine", None)
            if engine is not None and hasattr(engine, "destroy"):
                engine.destroy()
            del engine  # a local left here kept the engine (its weights, optimizer state) into the next point
        del trainer
        gc.collect()  # DeepSpeed's hooks make cycles: collected now, not at some later point
        if cuda:
            torch.cuda.empty_cache()
        live = live_training_objects()
        held = held_memory_report() if cuda else ""
        if held or live:
            print(f"[bench] rank {rank}: after {attention} S={S} {lay.name}: still alive: "
                  + "; ".join(filter(None, [", ".join(f"{n} x{c}" for n, c in sorted(live.items())), held])),
                  flush=True)
    # Every rank's peak memory; the row keeps the largest.
    peak = torch.tensor([float(summary.get("peak_memory_gb") or 0.0), float(status == "oom")],
                        device="cuda" if cuda else "cpu", dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if peak[1] > 0:
        return {"status": "oom", "micro_batch_size": mb}
    return {"status": "ok", "micro_batch_size": mb, "tp": summary["layout"]["tp"],
            "sp": summary["layout"]["sp"], "dp": summary["layout"]["dp"],
            "tokens_per_s_per_gpu": summary["tokens_per_s_per_rank"],
            "tflops_per_gpu": summary["tflops_per_rank"], "mfu": summary["mfu"],
            "seconds_per_step": summary["seconds_per_step"], "peak_memory_gb": float(peak[0]),
            "recompute": recompute,
            "steps": summary["steps"]}


_TRAINING_TYPES = ("Trainer", "DeepSpeedEngine", "DeepSpeedZeroOptimizer", "AdamW", "NSADecoderLM")


def live_training_objects() -> dict:
    """Type name -> count of the training objects (trainers, engines, optimizers, models) still
    alive: none should be once a point is over."""
    live = {}
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in _TRAINING_TYPES:
            live[name] = live.get(name, 0) + 1
    return live


def held_memory_report(min_gb: float = 1.0, top: int = 6) -> str:
    """What CUDA memory a finished point left allocated (after a garbage collection), if at
    least ``min_gb``: the total and the largest CUDA tensors Python can reach, each with the
    types of the objects that refer to it. A later point has that much less room (its
    ``recompute: auto`` keeps fewer layers). "" when less."""
    import torch

    held = torch.cuda.memory_allocated()
    if held < min_gb * 2 ** 30:
        return ""
    tensors = []
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.is_cuda:  # not compile's fake tensors
            try:
                obj.untyped_storage().data_ptr()
            except RuntimeError:
                continue
            tensors.append(obj)
    reach = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())
    out = [f"{held / 2 ** 30:.2f} GiB still allocated ({reach / 2 ** 30:.2f} GiB in tensors Python reaches)"]
    for t in sorted(tensors, key=lambda t: -t.untyped_storage().nbytes())[:top]:
        refs = sorted({type(r).__name__ for r in gc.get_referrers(t) if r is not tensors})
        out.append(f"{tuple(t.shape)} {t.dtype} {t.untyped_storage().nbytes() / 2 ** 20:.0f} MiB <- {', '.join(refs)}")
    del tensors
    return "; ".join(out)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line; ``key=value`` overrides anywhere, as for nsa-pretrain."""
    from .cli import parse_args as parse_anywhere

    return parse_anywhere(argv, build_parser())


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        run_grid(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"nsa-bench-train: error: {err}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``nsa-convert``: checkpoint conversion subcommands."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ..config import NSAConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _nsa_config(path: str | None) -> NSAConfig:
    return NSAConfig.from_yaml(path) if path else NSAConfig()


def cmd_from_hf(a) -> None:
    from .from_hf import from_hf
    report = from_hf(a.input, a.output, _nsa_config(a.nsa_config), DTYPES[a.dtype], a.force, quiet=a.quiet)
    print(report.summary())
    print(f"wrote {a.output}")


def cmd_to_hf(a) -> None:
    from .consolidate import check_against_model
    from .io import load_consolidated
    from .to_hf import to_hf
    if os.path.exists(a.output) and not a.force:  # before reading the weights
        raise FileExistsError(f"output {os.path.abspath(a.output)} already exists; pass --force to replace it")
    cfg, state = load_consolidated(a.input, quiet=a.quiet)
    check_against_model(state, cfg)
    tokenizer = a.tokenizer
    if tokenizer is None and os.path.isfile(os.path.join(a.input, "tokenizer.model")):
        tokenizer = a.input  # consolidate copies the run's tokenizer
    to_hf(state, cfg, a.output, DTYPES[a.dtype], a.force, tokenizer)
    loads = " and AutoTokenizer.from_pretrained(dir)" if tokenizer else " (no tokenizer: pass --tokenizer DIR)"
    print(f"wrote {a.output}: load it with AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)"
          f"{loads}")


def cmd_consolidate(a) -> None:
    from .consolidate import consolidate
    src = consolidate(a.input, a.output, DTYPES[a.dtype] if a.dtype else None, a.force,
                      master=a.master_weights, quiet=a.quiet, optimizer=a.optimizer)
    extra = " (with Adam's moments and the data position)" if a.optimizer else ""
    print(f"consolidated {src} -> {a.output}{extra}")


def cmd_reshard(a) -> None:
    from .reshard import reshard
    tag = reshard(a.input, a.output, reset_optimizer=a.reset_optimizer, tp=a.tp, sp=a.sp, cp=a.cp,
                  world_size=a.world_size, force=a.force, quiet=a.quiet,
                  allow_batch_change=a.allow_batch_change)
    what = "weights only, optimizer RESET" if a.reset_optimizer else "weights and Adam state"
    print(f"resharded -> {tag} ({what}); resume on any layout: nsa-pretrain --config ... --resume {a.output}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nsa-convert", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("input")
        sp.add_argument("output")
        sp.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
        sp.add_argument("--force", action="store_true", help="replace an existing output directory")
        sp.add_argument("--quiet", action="store_true", help="no progress display")

    sp = sub.add_parser("consolidate", help="training checkpoint (any TP/SP/DP layout, ZeRO 0-3) -> "
                                           "model.safetensors + config.json")
    sp.add_argument("input", help="run directory, its checkpoints/ folder or one step folder")
    sp.add_argument("output")
    sp.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: as trained")
    sp.add_argument("--master-weights", action="store_true",
                    help="ZeRO 1-2: the fp32 master copies from the optimizer shards (ZeRO-3 always)")
    sp.add_argument("--optimizer", action="store_true",
                    help="also write Adam's moments (optimizer.safetensors) and the data position, for reshard "
                         "(ZeRO 1-3; implies --master-weights)")
    sp.add_argument("--force", action="store_true", help="replace an existing output directory")
    sp.add_argument("--quiet", action="store_true", help="no progress display (also off when stderr is not a terminal)")
    sp.set_defaults(fn=cmd_consolidate)
    sp = sub.add_parser("reshard", help="training checkpoint (any layout, ZeRO 1-3) or consolidated model -> "
                                       "a layout-free checkpoint that --resume loads on any TP/SP/DP layout")
    sp.add_argument("input", help="run directory, checkpoints folder, step folder or consolidated directory")
    sp.add_argument("output", help="new checkpoints folder (pass it to nsa-pretrain --resume)")
    sp.add_argument("--reset-optimizer", action="store_true",
                    help="drop Adam's state (required where the source has none: ZeRO-0, consolidated "
                         "without --optimizer); recorded in the checkpoint and announced on resume")
    sp.add_argument("--allow-batch-change", action="store_true",
                    help="let the resumed run use another global batch than the source run (steps, data "
                         "position and LR schedule continue; each step then takes the new batch)")
    sp.add_argument("--tp", type=int, default=1, help="target tensor-parallel size to check the model against")
    sp.add_argument("--sp", type=int, default=1, help="target Ulysses size to check the model against")
    sp.add_argument("--cp", type=int, default=1, help="target context-parallel size to check the model against")
    sp.add_argument("--world-size", type=int, default=None, help="target world size (default tp x sp x cp)")
    sp.add_argument("--force", action="store_true", help="replace an existing output directory")
    sp.add_argument("--quiet", action="store_true", help="no progress display (also off when stderr is not a terminal)")
    sp.set_defaults(fn=cmd_reshard)
    sp = sub.add_parser("from-hf", help="dense Llama-style HF directory -> consolidated NSA checkpoint")
    common(sp)
    sp.add_argument("--nsa-config", help="YAML with NSAConfig fields (default: the paper's)")
    sp.set_defaults(fn=cmd_from_hf)
    sp = sub.add_parser("to-hf", help="consolidated NSA checkpoint -> HF directory (trust_remote_code)")
    common(sp)
    sp.add_argument("--tokenizer", help="tokenizer directory (tools/train_tokenizer.py output), written as a "
                                        "Hugging Face tokenizer (default: the one in the input folder, if any)")
    sp.set_defaults(fn=cmd_to_hf)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"nsa-convert {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0

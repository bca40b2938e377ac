"""``nsa-convert``: checkpoint conversion subcommands."""
from __future__ import annotations

import argparse
import sys

import torch

from ..config import NSAConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _nsa_config(path: str | None) -> NSAConfig:
    return NSAConfig.from_yaml(path) if path else NSAConfig()


def cmd_from_hf(a) -> None:
    from .from_hf import from_hf
    report = from_hf(a.input, a.output, _nsa_config(a.nsa_config), DTYPES[a.dtype], a.force)
    print(report.summary())
    print(f"wrote {a.output}")


def cmd_to_hf(a) -> None:
    from .io import load_consolidated
    from .to_hf import to_hf
    cfg, state = load_consolidated(a.input)
    to_hf(state, cfg, a.output, DTYPES[a.dtype], a.force, a.tokenizer)
    print(f"wrote {a.output}: load it with AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)")


def cmd_consolidate(a) -> None:
    from .consolidate import consolidate
    src = consolidate(a.input, a.output, DTYPES[a.dtype] if a.dtype else None, a.force)
    print(f"consolidated {src} -> {a.output}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nsa-convert", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("input")
        sp.add_argument("output")
        sp.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
        sp.add_argument("--force", action="store_true", help="replace an existing output directory")

    sp = sub.add_parser("consolidate", help="training checkpoint (any TP/SP/DP layout, ZeRO 0-2) -> "
                                           "model.safetensors + config.json")
    sp.add_argument("input", help="run directory, its checkpoints/ folder or one step folder")
    sp.add_argument("output")
    sp.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: as trained")
    sp.add_argument("--force", action="store_true", help="replace an existing output directory")
    sp.set_defaults(fn=cmd_consolidate)
    sp = sub.add_parser("from-hf", help="dense Llama-style HF directory -> consolidated NSA checkpoint")
    common(sp)
    sp.add_argument("--nsa-config", help="YAML with NSAConfig fields (default: the paper's)")
    sp.set_defaults(fn=cmd_from_hf)
    sp = sub.add_parser("to-hf", help="consolidated NSA checkpoint -> HF directory (trust_remote_code)")
    common(sp)
    sp.add_argument("--tokenizer", help="tokenizer directory to copy into the export")
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

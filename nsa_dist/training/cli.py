"""``nsa-pretrain``: NSA pretraining on DeepSpeed (run under torchrun / deepspeed / srun).

    nsa-pretrain --config configs/train/tiny_cpu.yaml [--resume auto] [key=value ...]

``key=value`` arguments override fields of the train YAML (e.g. ``train_steps=20``).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from .exits import (EXIT_BAD_INPUT, EXIT_PEER_LOST, EXIT_PREEMPTED, EXIT_SAVE_FAILED, CheckpointWriteError,
                    Preempted)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nsa-pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="YAML", help="train config (configs/train/*.yaml)")
    p.add_argument("--resume", default=None, metavar="auto|none|PATH",
                   help="auto: the latest complete checkpoint of output_dir (fresh start if none); "
                        "PATH: a checkpoint folder or a checkpoints folder with 'latest'")
    p.add_argument("--log-all-ranks", action="store_true", help="every rank prints, not only rank 0")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override train config fields")
    return p


def parse_args(argv: Optional[list[str]] = None, parser: Optional[argparse.ArgumentParser] = None
               ) -> argparse.Namespace:
    """The command line of ``parser`` (default: nsa-pretrain's); ``key=value`` overrides may
    come anywhere (before, between or after the options, e.g. after ``--resume auto``)."""
    return (parser or build_parser()).parse_intermixed_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cfg = None
    try:
        from .config import TrainConfig

        cfg = TrainConfig.from_yaml(args.config).apply_overrides(args.overrides)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        from .resume import resume_arg
        from .trainer import Trainer

        trainer = Trainer(cfg, resume=resume_arg(args.resume), log_all_ranks=args.log_all_ranks)
        try:
            summary = trainer.train()
        finally:
            trainer.close()
    except Preempted:
        _shutdown(barrier=False)
        return EXIT_PREEMPTED
    except CheckpointWriteError as err:
        print(f"nsa-pretrain: error: {err}", file=sys.stderr)
        return EXIT_SAVE_FAILED
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"nsa-pretrain: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:
        _exit_if_peer_lost(err, cfg.collective_timeout_s if cfg is not None else 0.0)
        raise
    if trainer.rank == 0:
        ev = f"{summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else "n/a"
        print(f"[done] steps {summary['steps']}: loss {summary['loss_first']:.4f} -> "
              f"{summary['loss_last']:.4f}, valid loss {ev}, "
              f"{summary['tokens_per_s_per_rank']:,.0f} tokens/s per rank; "
              f"checkpoint {summary['checkpoint']}")
    _shutdown()
    return 0


def _shutdown(barrier: bool = True) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def _exit_if_peer_lost(err: BaseException, timeout_s: float) -> None:
    """A collective that failed for a dead or frozen peer: name it and exit with
    ``EXIT_PEER_LOST`` at once (``os._exit``: tearing the process group down would wait
    for the peer again). Any other error returns and is raised as it is."""
    import os

    import torch.distributed as dist

    from .peers import lost_peer_message

    if not dist.is_initialized():
        return
    message = lost_peer_message(err, dist.get_rank(), dist.get_world_size(), timeout_s)
    if message is None:
        return
    print(f"nsa-pretrain: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_PEER_LOST)


if __name__ == "__main__":
    sys.exit(main())

"""Run a module as ``python -m`` would, with NSA kernel launch settings (kernels/launch.py) in force.

Usage (from the repository root; e.g. the 1b model's throughput with one setting changed):
    python -m torch.distributed.run --standalone --nproc_per_node 1 tools/with_launch.py \
        'split_bytes=2147483648' nsa_dist.training.bench --config configs/train/bench_1b.yaml --seq-len 32k ...
Settings are LaunchConfig fields as ``tools/bench_kernels.py --ab`` takes them (NAME=VALUE,...); a
bad name or value ends the run before the module starts. For A/B runs of a setting in the model
(the training configs do not carry launch settings: the defaults are the product's).
"""
from __future__ import annotations

import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        raise SystemExit("usage: with_launch.py 'NAME=VALUE,...' MODULE [ARGS...]")
    from bench_kernels import launch_config, parse_settings

    from nsa_dist.kernels.launch import use_launch

    settings, module = argv[0], argv[1]
    config = launch_config(parse_settings(settings)) if settings else launch_config({})
    print(f"[with_launch] {module} with {config.changed()}", flush=True)
    sys.argv = [module, *argv[2:]]
    with use_launch(config):  # every kernel call the module makes in this thread reads it
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

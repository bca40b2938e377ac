#!/usr/bin/env bash
# Single node with torchrun:  launch/torchrun.sh [--nproc N] CONFIG.yaml [args...]
# Extra args go to nsa-pretrain (e.g. --resume auto train_steps=100). Without a GPU it runs
# N (default 2) CPU ranks with gloo; with GPUs, one rank per GPU.
set -euo pipefail
source "$(dirname "$0")/common.sh"
setup_device
NPROC=$DEFAULT_NPROC
if [ "${1:-}" = "--nproc" ]; then NPROC=$2; shift 2; fi
need_config "$@"
CONFIG=$1; shift
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  -m nsa_dist.training --config "$CONFIG" "$@"

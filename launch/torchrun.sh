#!/usr/bin/env bash
# Single node with torchrun:  launch/torchrun.sh [--nproc N] [--entry MODULE] CONFIG.yaml [args...]
# Extra args go to nsa-pretrain (e.g. --resume auto train_steps=100). Without a GPU it runs
# N (default 2) CPU ranks with gloo; with GPUs, one rank per GPU.
set -euo pipefail
source "$(dirname "$0")/common.sh"
setup_device
NPROC=$DEFAULT_NPROC
ENTRY=nsa_dist.training  # --entry nsa_dist.training.bench: the throughput grid
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) NPROC=$2; shift 2 ;;
    --entry) ENTRY=$2; shift 2 ;;
    *) break ;;
  esac
done
need_config "$@"
CONFIG=$1; shift
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  -m "$ENTRY" --config "$CONFIG" "$@"

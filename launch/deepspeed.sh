#!/usr/bin/env bash
# DeepSpeed launcher, one node or many:
#   launch/deepspeed.sh [--nproc N] [--hostfile FILE] [--master-port P] [--entry MODULE] CONFIG.yaml [args...]
# With --hostfile (see launch/hostfile.example) the launcher starts ranks on every host over
# ssh/pdsh; without it, N local ranks (default: every GPU, or 2 CPU ranks with gloo).
# Extra args go to nsa-pretrain (e.g. --resume auto train_steps=100). --entry runs another
# module with the same --config convention (nsa_dist.training.bench: the throughput grid).
set -euo pipefail
source "$(dirname "$0")/common.sh"
setup_device
NPROC=$DEFAULT_NPROC
HOSTFILE=""
PORT=${MASTER_PORT:-29500}
ENTRY=nsa_dist.training
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) NPROC=$2; shift 2 ;;
    --hostfile) HOSTFILE=$2; shift 2 ;;
    --master-port) PORT=$2; shift 2 ;;
    --entry) ENTRY=$2; shift 2 ;;
    *) break ;;
  esac
done
need_config "$@"
CONFIG=$1; shift
ARGS=(--master_port "$PORT")
if [ -n "$HOSTFILE" ]; then
  [ -f "$HOSTFILE" ] || { echo "error: hostfile not found: $HOSTFILE" >&2; exit 2; }
  ARGS+=(--hostfile "$HOSTFILE")
else
  ARGS+=(--num_gpus "$NPROC")
fi
# --module: run nsa_dist.training as "python -m"; the trainer accepts --local_rank.
exec "$PYTHON" -m deepspeed.launcher.runner "${ARGS[@]}" --module "$ENTRY" \
  --config "$CONFIG" "$@"

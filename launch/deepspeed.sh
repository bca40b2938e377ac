#!/usr/bin/env bash
# DeepSpeed launcher, one node or many:
#   launch/deepspeed.sh [--nproc N] [--hostfile FILE [--node-rank R --master-addr HOST]]
#                       [--master-port P] [--entry MODULE] CONFIG.yaml [args...]
# Without --hostfile: N local ranks (default: every GPU, or 2 CPU ranks with gloo).
# With --hostfile (see launch/hostfile.example) alone, the launcher starts the ranks of every
# host over ssh/pdsh. With --node-rank and --master-addr too, nothing is started over ssh:
# run the same command on every node of the hostfile with its own --node-rank (DeepSpeed's
# --no_ssh mode); --master-addr is node 0's address, --master-port a free port there.
# Extra args go to nsa-pretrain (e.g. --resume auto train_steps=100). --entry runs another
# module with the same --config convention (nsa_dist.training.bench: the throughput grid).
set -euo pipefail
source "$(dirname "$0")/common.sh"
setup_device
NPROC=$DEFAULT_NPROC
HOSTFILE=""
NODE_RANK=""
ADDR=""
PORT=${MASTER_PORT:-29500}
ENTRY=nsa_dist.training
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) NPROC=$2; shift 2 ;;
    --hostfile) HOSTFILE=$2; shift 2 ;;
    --node-rank) NODE_RANK=$2; shift 2 ;;
    --master-addr) ADDR=$2; shift 2 ;;
    --master-port) PORT=$2; shift 2 ;;
    --entry) ENTRY=$2; shift 2 ;;
    -*) echo "error: unknown launcher option $1 (see the usage at the top of $0)" >&2; exit 2 ;;
    *) break ;;
  esac
done
need_config "$@"
CONFIG=$1; shift
ARGS=(--master_port "$PORT")
if [ -n "$HOSTFILE" ]; then
  [ -f "$HOSTFILE" ] || { echo "error: hostfile not found: $HOSTFILE" >&2; exit 2; }
  ARGS+=(--hostfile "$HOSTFILE")
  if [ -n "$NODE_RANK" ]; then
    [ -n "$ADDR" ] || { echo "error: --node-rank needs --master-addr (node 0's address)" >&2; exit 2; }
    ARGS+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "$ADDR")
    case "$ADDR" in 127.*|localhost) export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} ;; esac
  elif [ -n "$ADDR" ]; then
    ARGS+=(--master_addr "$ADDR")
  fi
else
  [ -z "$NODE_RANK" ] || { echo "error: --node-rank needs --hostfile (every node's slots)" >&2; exit 2; }
  ARGS+=(--num_gpus "$NPROC")
fi
# --module: run nsa_dist.training as "python -m"; the trainer accepts --local_rank.
exec "$PYTHON" -m deepspeed.launcher.runner "${ARGS[@]}" --module "$ENTRY" \
  --config "$CONFIG" "$@"

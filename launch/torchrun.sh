#!/usr/bin/env bash
# torchrun, one node or many, restarting failed ranks:
#   launch/torchrun.sh [--nproc N] [--nnodes N] [--node-rank R] [--master-addr HOST]
#                      [--master-port P] [--max-restarts K] [--grace S] [--entry MODULE]
#                      CONFIG.yaml [nsa-pretrain args...]
# One node: no --master-addr needed (127.0.0.1, a free port). Several nodes: run it once on
# every node with the same --nnodes, --master-addr (node 0's address) and --master-port, and
# that node's --node-rank (c10d rendezvous: ranks are dealt in the order the nodes join,
# node 0 hosts the store). Without a GPU: N (default 2) CPU ranks per node with gloo.
# --max-restarts K (default 0): when a rank dies, every rank is restarted up to K times and
# resumes from the newest good checkpoint by itself (nsa-pretrain sees TORCHELASTIC_RESTART_COUNT).
# --grace S (default 120): on SIGTERM/SIGINT/SIGUSR1 the ranks get S seconds to finish their
# step and save (they exit with status 75) before torchrun kills them.
# Extra args go to nsa-pretrain (e.g. --resume auto train_steps=100).
set -euo pipefail
source "$(dirname "$0")/common.sh"
setup_device
NPROC=$DEFAULT_NPROC
ENTRY=nsa_dist.training  # --entry nsa_dist.training.bench: the throughput grid
NNODES=1
NODE_RANK=0
ADDR=""
PORT=${MASTER_PORT:-}
RESTARTS=0
GRACE=120
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) NPROC=$2; shift 2 ;;
    --nnodes) NNODES=$2; shift 2 ;;
    --node-rank) NODE_RANK=$2; shift 2 ;;
    --master-addr) ADDR=$2; shift 2 ;;
    --master-port) PORT=$2; shift 2 ;;
    --max-restarts) RESTARTS=$2; shift 2 ;;
    --grace) GRACE=$2; shift 2 ;;
    --entry) ENTRY=$2; shift 2 ;;
    -*) if [ -f "$1" ]; then break; fi
        echo "error: unknown launcher option $1 (see the usage at the top of $0)" >&2; exit 2 ;;
    *) break ;;
  esac
done
need_config "$@"
CONFIG=$1; shift
if [ "$NNODES" -gt 1 ] && [ -z "$ADDR" ]; then
  echo "error: --nnodes $NNODES needs --master-addr (node 0's address) and --master-port" >&2; exit 2
fi
ADDR=${ADDR:-127.0.0.1}
if [ -z "$PORT" ]; then
  [ "$NNODES" -gt 1 ] && { echo "error: --nnodes $NNODES needs --master-port" >&2; exit 2; }
  PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
EXTRA=()
case "$ADDR" in
  127.*|localhost)  # a loopback job: every connection stays on loopback
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
    EXTRA+=(--local-addr 127.0.0.1) ;;
esac
if [ "$NNODES" -gt 1 ]; then
  # Node 0 hosts the rendezvous store. Each rendezvous round gets a fresh worker store on
  # node 0 (the agents of different nodes may count restarts differently, so the trainer
  # could not tell one attempt's keys from another's by the restart count).
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
  if [ "$NODE_RANK" -eq 0 ]; then EXTRA+=(--rdzv-conf is_host=true); else EXTRA+=(--rdzv-conf is_host=false); fi
fi
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --nproc-per-node "$NPROC" --rdzv-backend c10d --rdzv-endpoint "$ADDR:$PORT" \
  --rdzv-id "${RDZV_ID:-nsa_dist}" --max-restarts "$RESTARTS" --monitor-interval 1 \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "$GRACE" \
  "${EXTRA[@]}" -m "$ENTRY" --config "$CONFIG" "$@"

#!/usr/bin/env bash
# The runs behind docs/scaling.md, on one node of N GPUs (4 and 2 H200 there):
#   tools/bench_scaling.sh OUT_DIR PHASE...
# Phases:
#   check    NCCL equivalence of every layout with one GPU (fp32 reference, bf16 Triton) and
#            per-layout collective timings (tests/distributed/gpu_check.py)
#   bf16     only the bf16 / Triton part of check
#   busbw    all-gather / reduce-scatter / all-reduce / all-to-all bus bandwidth, 256 MiB
#   grid32   1b throughput, NSA and dense, every layout at 32k   (-> OUT_DIR/throughput.csv)
#   grid64   the same at 64k
#   grid8    the same at 8k
#   grid128  Ulysses=4 and TP=2 x Ulysses=2 at 128k
#   weak     weak scaling: 1 GPU at 8k and 32k, TP=4 at 32k with micro-batch 4
#   longest  the longest context that trains (Ulysses=N, checkpointing): NSA 256k..1M, dense 256k..
# Each phase runs under a time limit so that one hung or failed phase costs only itself.
set -uo pipefail
OUT=${1:?usage: tools/bench_scaling.sh OUT_DIR PHASE...}; shift
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT"
N=${NGPU:-$(nvidia-smi -L | grep -c '^GPU')}
PY=${PYTHON:-python3}
CFG=configs/train/bench_1b.yaml
# the layouts of docs/scaling.md for N GPUs (4: dp,tp2,tp4,sp4,tp2sp2; 2: dp,tp2,sp2); LAYOUTS overrides
if [ -z "${LAYOUTS:-}" ]; then
  case "$N" in
    1) LAYOUTS="dp" ;;
    2) LAYOUTS="dp,tp2,sp2" ;;
    *) LAYOUTS="dp,tp2,tp$N,sp$N,tp2sp$((N / 2))" ;;
  esac
fi
bench() {  # bench NPROC LIMIT_S ARGS...
  local n=$1 limit=$2; shift 2
  timeout --signal=KILL "$limit" launch/deepspeed.sh --nproc "$n" --master-port $((29500 + RANDOM % 1000)) \
    --entry nsa_dist.training.bench "$CFG" --out "$OUT/throughput.csv" \
    --max-minutes "$(awk -v l="$limit" 'BEGIN { printf "%.2f", (l - 40) / 60 }')" "$@" ${BENCH_EXTRA:-} 2>&1 | tee -a "$OUT/full.log" \
    | grep -E '^\[bench\]|rror|Traceback' || true
}
for phase in "$@"; do
  echo "== $phase $(date -u +%H:%M:%S)"
  case "$phase" in
    check) timeout --signal=KILL 300 $PY tests/distributed/gpu_check.py --gpus "$N" --seq 16384 2>&1 \
             | grep -E '^(check|bf16|time|[0-9]+ GPUs)|Error|assert' ;;
    bf16) timeout --signal=KILL 150 $PY tests/distributed/gpu_check.py --gpus "$N" --parts bf16 2>&1 \
             | grep -E '^(bf16|time|[0-9]+ GPUs)|failed' ;;
    busbw) timeout --signal=KILL 120 $PY -m torch.distributed.run --standalone --nproc_per_node "$N" \
             tools/bench_collectives.py --mib 256 2>&1 | grep -E '^\[busbw\]|rror' ;;
    grid32) bench "$N" 150 --seq-len 32k --layouts "$LAYOUTS" --attention nsa,dense ;;
    grid64) bench "$N" 270 --seq-len 64k --layouts "$LAYOUTS" --attention nsa,dense train_steps=3 ;;
    grid8) bench "$N" 100 --seq-len 8k --layouts "$LAYOUTS" --attention nsa,dense ;;
    grid128) bench "$N" 90 --seq-len 128k --layouts "sp$N" --attention nsa,dense train_steps=3 ;;
    weak) bench 1 75 --seq-len 8k,32k --layouts dp --attention nsa,dense
          bench "$N" 100 --seq-len 32k --layouts "tp$N:mb$N" --attention nsa,dense ;;
    longest) bench "$N" 200 --seq-len 256k,512k,1024k --layouts "sp$N" --attention nsa --stop-on-oom train_steps=2 \
             loss_chunk_tokens=16384
             bench "$N" 100 --seq-len 256k --layouts "sp$N" --attention dense train_steps=2 ;;
    *) echo "unknown phase $phase" >&2; exit 2 ;;
  esac
done
echo "== done $(date -u +%H:%M:%S)"

# Shared by the launchers (sourced): repository root, python, CPU/GPU detection.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 0
  fi
}

# No GPU: DeepSpeed's CPU accelerator with gloo (the trainer picks gloo on CPU), and
# $CPU_RANKS ranks per node (default 2) splitting the cores between them.
setup_device() {
  NGPU=$(gpu_count)
  if [ "$NGPU" -eq 0 ]; then
    export DS_ACCELERATOR=cpu
    DEFAULT_NPROC=${CPU_RANKS:-2}
  else
    DEFAULT_NPROC=$NGPU
  fi
}

need_config() {
  if [ $# -lt 1 ] || [ ! -f "$1" ]; then
    echo "usage: $0 [launcher options] CONFIG.yaml [nsa-pretrain args, key=value overrides]" >&2
    [ $# -ge 1 ] && echo "error: train config not found: $1" >&2
    exit 2
  fi
}

#!/usr/bin/env bash
# Create ./.venv with nsa_dist installed (editable) and its test/training dependencies.
# No GPU: the CPU build of torch is installed first, so no dependency pulls a CUDA build.
# GPU machine with torch already installed: the venv sees that torch (system site packages).
# Re-running is cheap: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.nsa_dist_installed
WANT=$(cat setup.py pyproject.toml tools/setup_env.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
system_torch() { "$PYTHON" -c "import torch" >/dev/null 2>&1; }

if [ ! -x "$VENV/bin/python" ]; then
  if has_gpu && system_torch; then
    echo "[setup] GPU machine with torch present: venv uses the system torch"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if has_gpu; then
    echo "[setup] installing torch (GPU machine)"
    $PIP install torch
  else
    echo "[setup] installing the CPU build of torch"
    $PIP install "torch==2.13.0" || $PIP install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
echo "[setup] installing nsa_dist and its test/training dependencies"
$PIP install -e ".[test]"
echo "$WANT" > "$STAMP"

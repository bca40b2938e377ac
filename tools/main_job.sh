#!/usr/bin/env bash
# The README's main job (make main): tokenizer + shards of the embedded corpus (the Python
# standard library's .py sources; both cached in data_cache/), then a few minutes of tiny NSA
# pretraining with 2 data-parallel CPU ranks under the deepspeed launcher, evaluation,
# TensorBoard logs, a checkpoint and a summary. Extra args go to nsa-pretrain
# (e.g. tools/main_job.sh train_steps=100). Each run replaces the previous one's output.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHON=$PY PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
CONFIG=configs/train/tiny_cpu.yaml
OUT=$("$PY" -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['output_dir'])" "$CONFIG")
START=$(date +%s)

echo "== 1/3 tokenizer (cached in data_cache/tokenizer)"
"$PY" tools/train_tokenizer.py --vocab-size 2048 --output data_cache/tokenizer
echo "== 2/3 token shards of the standard library's sources (cached in data_cache/stdlib_*)"
"$PY" tools/preprocess_data.py --tokenizer data_cache/tokenizer --output-prefix data_cache/stdlib \
  --workers 2 --valid-fraction 0.01
echo "== 3/3 pretraining: tiny NSA LM, 2 ranks, deepspeed launcher ($CONFIG; replaces $OUT)"
rm -rf "$OUT"
bash launch/deepspeed.sh --nproc 2 "$CONFIG" "$@" 2>&1 \
  | grep -v -E '^\[W[0-9]|\[INFO\]|FutureWarning|return func\(\*args|apply_to_tensors_only' || true
[ -f "$OUT/summary.json" ] || { echo "main job: training failed (no $OUT/summary.json)" >&2; exit 1; }
END=$(date +%s)

"$PY" - "$OUT/summary.json" "$((END - START))" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
curve = s["loss_curve"]
# Mean loss of each tenth of the run (single steps are noisy at this batch size).
n = len(curve)
tenths = [curve[i * n // 10:(i + 1) * n // 10] for i in range(10)] if n >= 10 else [[c] for c in curve]
marks = [(part[-1][0], sum(l for _, l in part) / len(part)) for part in tenths if part]
print("\n== summary")
print(f"  wall time (tokenizer+shards+training): {int(sys.argv[2])} s   (training {s['train_seconds']:.0f} s, {s['steps']} steps)")
print(f"  train loss first -> last:             {s['loss_first']:.3f} -> {s['loss_last']:.3f}")
print(f"  mean loss per tenth (up to step):     " + ", ".join(f"{st}: {l:.2f}" for st, l in marks))
print(f"  validation loss:                      {s['eval_loss']:.3f}")
print(f"  throughput:                           {s['tokens_per_s_per_rank']:,.0f} tokens/s per rank, "
      f"{s['tokens_per_s_total']:,.0f} total ({s['ranks']} ranks, ZeRO-{s['zero_stage']}, {s['precision']})")
print(f"  tokens seen:                          {s['tokens_seen']:,}")
print(f"  checkpoint:                           {s['checkpoint']}")
print(f"  TensorBoard logs:                     {s['tensorboard']}")
print(f"  open TensorBoard:                     .venv/bin/tensorboard --logdir {s['tensorboard']}")
print(f"  resume:                               launch/deepspeed.sh configs/train/tiny_cpu.yaml --resume auto train_steps=1200")
PYEOF

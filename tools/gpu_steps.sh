#!/usr/bin/env bash
# Benchmark and GPU-test steps for one call on a lent GPU machine (docs/benchmarks.md gives the
# figures each step produced). Run from the repository root there:
#   TREE=<commit> STEPS="tests m32 kd" OUT=<folder> bash tools/gpu_steps.sh
# Steps run in the order given; each has a time limit and writes its log (and CSVs) under $OUT.
# TREE names the files: give this checkout's commit from here (the device copy's git HEAD may
# be an older commit: `git rev-parse` there named 07f5234 for da9d960's files once).
# Packages the machine lacks travel as wheels in .whl/ (git-ignored), built here with:
#   python -m pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl pydantic pydantic-core annotated-types \
#       typing-inspection typing_extensions hjson
set -u
OUT=${OUT:?set OUT to the folder for logs and CSVs}
TREE=${TREE:-tree}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1 || { echo "installing .whl/ failed"; exit 3; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# the peer baseline (never vendored): mdy666/Scalable-Flash-Native-Sparse-Attention's flash_nsa/
# (commit fcf117c) copied under .peer/ (git-ignored), carried with the call
if [ -d .peer/flash_nsa ]; then export PYTHONPATH=$PWD/.peer:$PYTHONPATH; fi
T0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m nsa_dist.training.bench --config configs/train/bench_1b.yaml"
K="python3 tools/bench_kernels.py"
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
NCU_ARGS="--clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy --section LaunchStats \
  --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section SchedulerStats"
run() {  # name limit_s command
  local name=$1 limit=$2
  shift 2
  echo "=== $name $(date -u +%H:%M:%S) (after $(( $(date +%s) - T0 )) s)"
  timeout "$limit" bash -c "$*" 2>&1 | tee "$OUT/$name.log" | grep -v "Warning\|warn(\|^  outs = \|^  o = \|^  return func" | tail -40
  echo "=== $name rc=${PIPESTATUS[0]} $(date -u +%H:%M:%S)"
}
ab() {  # name limit_s settings shape tag: one launch-setting A/B at 64k, two interleaved rounds
  run "$1" "$2" "$K --ab '$3' --rounds 2 --shapes $4 --sizes 64k --out $OUT --tag _${TREE}$5"
}
for s in ${STEPS:?set STEPS, e.g. \"tests m32\"}; do case $s in
  # GPU kernel tests (bf16 against the fp32 reference, every G; packed documents; wide heads)
  tests) run tests 300 "python3 -m pytest -q -x tests/ops/test_kernels_gpu.py -k 'bf16_within or packed_documents_bf16 or long_sequence or (16_bit_head_dims and bf16 and 192) or (fused_selected and 4-) or through_tma'" ;;
  # the gate combination in the selected branch's last kernel (launch.gate_fused), the
  # window and forced blocks in one launch (launch.window_forced) and the gate backward in the
  # range dq (launch.gate_bwd_fused), fifteenth session: on the GPU bit-identical to the separate
  # launches; then their A/B at (a) and (c) 64k: kgate the forward two, each and both; kgbwd the
  # backward one and all three. Defaults since the sixteenth session (window_forced from G = 16),
  # so each A/B turns a setting off: "changed" is the separate launches
  tgate) run tgate 300 "python3 -m pytest -q tests/ops/test_kernels_gpu.py -k fusions_match" ;;
  kgbwd) for sh in a_paper c_small_g; do
      ab kgbwd_$sh 200 gate_bwd_fused=False $sh _gbwd_off_$sh
      ab kall_$sh 200 gate_fused=False,window_forced=False,gate_bwd_fused=False $sh _all_off_$sh
    done ;;
  kgate) for sh in a_paper c_small_g; do
      ab kgate_$sh 200 gate_fused=False $sh _gate_off_$sh
      ab kwinf_$sh 200 window_forced=$([ $sh = a_paper ] && echo False || echo True) $sh _winf_flip_$sh
    done ;;
  # the compressed forward at the peer's tile (128 rows, 64 keys, 4 warps, 2 stages: two programs
  # an SM at 98 KB of shared memory; the default 64 rows x 3 stages take 115 KB, one an SM), never
  # timed (sixteenth session: offline builds 255 registers, 212 B of spill code, as the peer's own
  # kernel: 255, 108 B); A/B at (a) and (c) 64k
  kcmp) for sh in a_paper c_small_g; do
      ab kcmp_$sh 200 "range_cmp_fwd_rows=128,range_cmp_fwd=(4,2)" $sh _cmp128_$sh
    done ;;
  # the layer's split (RoPE, phi's chunks) and phi kernels against the PyTorch lines, bf16
  tlayer) run tlayer 200 "python3 -m pytest -q -x tests/ops/test_layer_ops_gpu.py" ;;
  # the 1b model's NSA at 32k, this tree against a base tree in .base/ (git-ignored, carried:
  # git archive BASE | tar -x -C .base), 8 steps each, alternating this, base, this, base;
  # then dense once (this tree)
  mbase32) for i in 1 2; do
      run mbase32_this$i 200 "$B --seq-len 32k --attention nsa --out $OUT/mbase32_this$i.csv train_steps=8"
      run mbase32_base$i 200 "cd .base && PYTHONPATH=$PWD/.base:/tmp/site python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m nsa_dist.training.bench --config configs/train/bench_1b.yaml --seq-len 32k --attention nsa --out $OUT/mbase32_base$i.csv train_steps=8"
    done
    run mbase32_dense 200 "$B --seq-len 32k --attention dense --out $OUT/mbase32_dense.csv train_steps=8" ;;
  # the kernels (a) and (c) at 64k, this tree against the base tree in .base/ (as mbase32),
  # alternating this, base, this, base, no dense baseline (the code change's own A/B)
  kbase) for i in 1 2; do
      run kbase_this$i 150 "$K --bench --baselines '' --shapes a_paper,c_small_g --sizes 64k --out $OUT --tag _kbase_this$i"
      run kbase_base$i 150 "cd .base && PYTHONPATH=$PWD/.base:/tmp/site python3 tools/bench_kernels.py --bench --baselines '' --shapes a_paper,c_small_g --sizes 64k --out $OUT --tag _kbase_base$i"
    done ;;
  # the 1b model, NSA against dense (SDPA's fastest backend), tokens/s per GPU
  m8) run m8 200 "$B --seq-len 8k --attention nsa,dense --out $OUT/m8.csv train_steps=8" ;;
  m32) run m32 300 "$B --seq-len 32k --attention nsa,dense --out $OUT/m32.csv" ;;
  m64) run m64 400 "$B --seq-len 64k --attention nsa,dense --out $OUT/m64.csv" ;;
  # the 1b model with recompute "min" (fifteenth session, prepared: nothing recomputed in as many
  # of the last layers as their activations fit, NSA and dense alike), 32k, 8k and 64k; compare
  # with m32 / m8 / m64 (recompute "auto") on the same machine; the CSVs' recompute column
  # names each point's plan
  # (mmin64 its own call: with mmin's 500 s it would pass a call's 600 s)
  mmin) run mmin32 300 "$B --seq-len 32k --attention nsa,dense --out $OUT/mmin32.csv 'model_overrides={recompute: min}'"
    run mmin8 200 "$B --seq-len 8k --attention nsa,dense --out $OUT/mmin8.csv train_steps=8 'model_overrides={recompute: min}'" ;;
  mmin64) run mmin64 400 "$B --seq-len 64k --attention nsa,dense --out $OUT/mmin64.csv 'model_overrides={recompute: min}'" ;;
  # the 1b attention layer alone, NSA against dense, forward + backward (bars 1.6x at 32k, 2.8x at 64k)
  layer) run layer 240 "python3 tools/profile_attention.py --model configs/model/1b.yaml --seq 32768 --heads 32:8 && python3 tools/profile_attention.py --model configs/model/1b.yaml --seq 65536 --heads 32:8" ;;
  # where the step goes (per part and per kernel)
  sp8) run sp8 300 "python3 -m nsa_dist.training.step_profile --config configs/train/bench_1b.yaml --seq-len 8k --top 30 --out $OUT/sp8.csv" ;;
  sp32) run sp32 300 "python3 -m nsa_dist.training.step_profile --config configs/train/bench_1b.yaml --seq-len 32k --attention nsa --top 30 --out $OUT/sp32.csv" ;;
  # kernels against cuDNN / flash (and the peer where installed), the shapes
  ka) run ka 300 "$K --bench --shapes a_paper,c_small_g --sizes 32k,64k --out $OUT --tag _${TREE}_ac" ;;
  kpeer) run kpeer 300 "$K --bench --samples 5 --shapes a_paper --sizes 32k,64k --baselines cudnn,peer --out $OUT --tag _${TREE}_peer" ;;
  # per-kernel times of the peer and of ours with its branches, (a) 64k: where its forward wins
  kpeerprof) run kpeerprof 240 "$K --profile-peer --shapes a_paper --sizes 64k" ;;
  kd) run kd 200 "$K --bench --shapes d_seeds --sizes 32k,64k --out $OUT --tag _${TREE}_d" ;;
  # per-kernel times of one (a) and one (c) forward + backward at 64k (the (a) forward runs at
  # about a third of cuDNN's rate per attended key: where its 45 ms go)
  kprof) run kprof 240 "$K --profile --shapes a_paper --sizes 64k && $K --profile --shapes c_small_g --sizes 64k" ;;
  # the block selection alone at (c) and (a), 8k and 64k, and its launch grid at 64k (rows per program, compressed
  # tokens per product, warps / stages of the chunks of whole blocks): 7.1 ms of (c)'s 28.7 ms
  # forward at 64k (eleventh session)
  ksel) run ksel 300 "python3 tools/bench_selection.py --shapes c_small_g,a_paper --sizes 8k,64k --sweep" ;;
  # launch-setting sweeps at 64k (selection given), one key each
  ksweep_range) run ksweep_range 300 "$K --sweep --sweep-keys range_dq,range_dq_rows,range_dq_keys,range_dkdv --shapes c_small_g --sizes 64k --out $OUT --tag _${TREE}_range" ;;
  # the paper shape's own kernels (G = 16: position-major selected forward / dq, long dK/dV
  # lists) and the range kernels at (a) 64k, one round (the (a) backward was 3.90x cuDNN on
  # 2026-12-07, the bar 4x)
  ksweep_a) run ksweep_a 300 "$K --sweep --sweep-keys sel_fwd,sel_dq,sel_rows,sel_dkdv_seg_rows,sel_dkdv,range_dkdv,range_dq,range_fwd,dkdv_qchunk,first_programs,dkdv_keys --rounds 1 --shapes a_paper --sizes 64k --out $OUT --tag _${TREE}_a" ;;
  # the compressed branch's forward with tiles of its own (range_cmp_fwd_*; prepared in the
  # eleventh session) at (a) and (c) 64k, two rounds
  ksweep_cmp) run ksweep_cmp 300 "$K --sweep --sweep-keys range_cmp_fwd_keys,range_cmp_fwd_rows --rounds 2 --shapes a_paper,c_small_g --sizes 64k --out $OUT --tag _${TREE}_cmp" ;;
  ksplit_c) run ksplit_c 200 "$K --ab split_bytes=2147483648 --rounds 2 --shapes c_small_g --sizes 64k --out $OUT --tag _${TREE}_c_split" ;;
  # hardware counters of every Triton kernel of one (c) 32k forward+backward (ncu; Firecracker
  # machines read them, gVisor ones do not: docs of the device); ncu_cf: with the fused dq
  ncu_c) run ncu_c 420 "$NCU $NCU_ARGS -k regex:'^_(sel_bwd_dkdv|sel_bwd_dq_split|sel_fwd_split|range_bwd_dkdv|range_bwd_dq)$' -c 12 python3 tools/bench_kernels.py --ncu --shapes c_small_g --sizes 32k" ;;
  ncu_cf) run ncu_cf 300 "$NCU $NCU_ARGS -k regex:'^_sel_bwd' python3 tools/bench_kernels.py --ncu --shapes c_small_g --sizes 32k --launch sel_dq_algo=fused" ;;
  # the 1b model's NSA under launch settings M32PF="NAME=VALUE,..." against dense, one process
  # (tools/with_launch.py: the training configs do not carry launch settings)
  m32pf) run m32pf 300 "python3 -m torch.distributed.run --standalone --nproc_per_node 1 tools/with_launch.py '${M32PF:?set M32PF to the launch settings}' nsa_dist.training.bench --config configs/train/bench_1b.yaml --seq-len 32k --attention nsa,dense --out $OUT/m32pf.csv" ;;
  # one launch-setting A/B at (c) 64k, AB="NAME=VALUE,..." (tenth session: AB='sel_dkdv=(8,2)',
  # then the step kdkv8: 11% slower), then the 1b model at 32k with it against dense, in one
  # process, only if the kernels gained >= 2% (tools/ab_gain.py)
  kab) ab kab 200 "${AB:?set AB to the launch settings}" c_small_g _ab ;;
  # short sequences: a launch-setting A/B of (c) at 8k, then 16k (eleventh session, prepared:
  # AB=dkdv_programs=512, shorter compressed dK/dV query chunks where its grid is narrow), then
  # the 1b model at 8k with it against dense, in one process
  kab8) run kab8 200 "$K --ab '${AB:?set AB}' --rounds 2 --shapes c_small_g --sizes 8k --out $OUT --tag _${TREE}_ab8 && $K --ab '$AB' --rounds 2 --shapes c_small_g --sizes 16k --out $OUT --tag _${TREE}_ab16" ;;
  m8ab) run m8ab 200 "python3 -m torch.distributed.run --standalone --nproc_per_node 1 tools/with_launch.py '${AB:?set AB}' nsa_dist.training.bench --config configs/train/bench_1b.yaml --seq-len 8k --attention nsa,dense --out $OUT/m8ab.csv train_steps=8" ;;
  # the selection's compressed key tiles through TMA (select_tma, prepared in the thirteenth
  # session), (a) and (c) 64k, against the defaults in one process each
  kselect_tma) ab kselect_tma_a 200 select_tma=True a_paper _seltma_a
    ab kselect_tma_c 200 select_tma=True c_small_g _seltma_c ;;
  # 64 compressed keys a step in the compressed forward with TMA ((a) 64k: about 1.5% beyond
  # TMA alone across two processes, thirteenth session), (c) and (a) in one process each
  # (fourteenth session: -1.9% / -2.5%, then made default: this step now A/Bs 64 against 32)
  kcmp64) ab kcmp64_c 200 range_cmp_fwd_keys=32 c_small_g _cmp64_c
    ab kcmp64_a 200 range_cmp_fwd_keys=32 a_paper _cmp64_a ;;
  # the range kernels' tiles again now that TMA loads free registers (thirteenth session: the
  # compressed forward at 64 x 32 builds at 136 registers instead of 166), (c) and (a) 64k
  # the (a) forward's range tiles with TMA loads (the window at 64 rows, 4 positions x 16 heads,
  # ran at about 300 TFLOP/s against the compressed branch's 440; fifteenth session, prepared)
  ksweep_fwd_a) run ksweep_fwd_a 400 "$K --sweep --sweep-keys range_fwd_rows,range_fwd_keys,range_cmp_fwd_rows,range_cmp_fwd_keys --rounds 1 --shapes a_paper --sizes 64k --out $OUT --tag _${TREE}_fwd_a" ;;
  ksweep_tma) run ksweep_tma 420 "$K --sweep --sweep-keys range_fwd_keys,range_cmp_fwd_keys,range_dq_keys,range_dq_rows,dkdv_keys,range_dkdv --rounds 1 --shapes c_small_g,a_paper --sizes 64k --out $OUT --tag _${TREE}_tma" ;;
  # TMA loads (launch.range_tma, sel_tma; thirteenth session): A/B of each against the defaults
  # at (a) 64k, with the compressed forward's wider key tiles, then range_tma at (c) 64k
  ktma) i=0; for ab in "range_tma=True,sel_tma=True" "range_tma=True,sel_tma=True,range_cmp_fwd_keys=64" \
        "range_tma=True,sel_tma=True,range_cmp_fwd_keys=128" \
        "range_tma=True,sel_tma=True,range_cmp_fwd_rows=128,range_cmp_fwd_keys=64,range_cmp_fwd=(8,3)" \
        "dkdv_tma=True"; do i=$((i + 1))
      run ktma_a$i 200 "$K --ab '$ab' --rounds 2 --shapes a_paper --sizes 64k --out $OUT --tag _${TREE}_tma_a$i"
    done
    run ktma_c1 200 "$K --ab 'range_tma=True' --rounds 2 --shapes c_small_g --sizes 64k --out $OUT --tag _${TREE}_tma_c1"
    run ktma_c2 200 "$K --ab 'dkdv_tma=True' --rounds 2 --shapes c_small_g --sizes 64k --out $OUT --tag _${TREE}_tma_c2" ;;
  # Dk in three 64-wide pieces through TMA boxes (fourteenth session): the pointer loads
  # against the defaults at (d) the seeds' shape (G = 4: range kernels) and (e) paper.yaml's
  # heads (G = 16: the selected kernels too), 64k, one process each
  kab_d) ab kab_d 200 range_tma=False,dkdv_tma=False,sel_tma=False d_seeds _pieces_d
    ab kab_e 200 range_tma=False,dkdv_tma=False,sel_tma=False e_paper_yaml _pieces_e ;;
  # AB (and AB2 where set) at (a) and at (c) 64k, two interleaved rounds in one process each
  # (fourteenth session: AB=sel_forced=False, the forced blocks back in the selected kernels now
  # that the position-major ones load through TMA; AB2=range_fwd_keys=64, the window's and forced
  # blocks' key steps with TMA loads)
  kab_ac) for sh in a_paper c_small_g; do
      ab kab_ac_$sh 200 "${AB:?set AB}" $sh _ab_$sh
      if [ -n "${AB2:-}" ]; then ab kab2_ac_$sh 200 "$AB2" $sh _ab2_$sh; fi
    done ;;
  # the same A/B at the paper shape (a) 64k; AB2 (optional) a second setting in the same step
  kab_a) ab kab_a 240 "${AB:?set AB}" a_paper _ab_a
    if [ -n "${AB2:-}" ]; then ab kab_a2 240 "$AB2" a_paper _ab_a2; fi ;;
  m32ab_if) if python3 tools/ab_gain.py $OUT/kernel_ab_${TREE}_ab.csv --min-gain 0.02; then
      run m32ab 300 "python3 -m torch.distributed.run --standalone --nproc_per_node 1 tools/with_launch.py '${AB:?set AB}' nsa_dist.training.bench --config configs/train/bench_1b.yaml --seq-len 32k --attention nsa,dense --out $OUT/m32ab.csv"
    else echo "m32ab_if: no kernel gain, no model run"; fi ;;
  # the backward kernels that spill at (c): selected dK/dV, range dq, selected dq split; one round
  kspill) run kspill 240 "$K --sweep --sweep-keys sel_dkdv_regs,range_dq,sel_dq_split --rounds 1 --shapes c_small_g --sizes 64k --out $OUT --tag _${TREE}_spill" ;;
  # rows per step of the block-major selected kernels (the dK/dV's 32 rows gained 2-3% in the
  # tenth session): 16 / 64 dK/dV rows, 32 / 128 dq-split and forward-split rows; (c) and (a)
  krows) run krows 300 "$K --sweep --sweep-keys sel_dkdv_rows,sel_dq_split_rows,sel_split_rows --rounds ${KROWS_ROUNDS:-2} --shapes c_small_g,a_paper --sizes 64k --out $OUT --tag _${TREE}_rows" ;;
  # registers, stack and local (spill) bytes of every kernel Triton built in this call (cuobjdump)
  res) CUOBJ=$(command -v cuobjdump || ls /usr/local/cuda/bin/cuobjdump 2>/dev/null | head -1)
    [ -n "$CUOBJ" ] || { echo "res: no cuobjdump on this machine (CUDA toolkit's bin/)"; continue; }
    for f in $(ls -t ~/.triton/cache/*/*.cubin 2>/dev/null); do echo "== $(basename $f)"; $CUOBJ -res-usage $f 2>&1 | grep -i "function\|reg"; done > $OUT/res_usage.txt
    tail -60 $OUT/res_usage.txt ;;
  *) echo "unknown step $s" ;;
esac; done
echo "done after $(( $(date +%s) - T0 )) s"

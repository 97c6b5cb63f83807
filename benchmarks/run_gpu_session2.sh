#!/usr/bin/env bash
# One device call of session 2: each step under its own time limit, everything under $OUT, short
# tables last. STEPS picks steps (comma-separated); MODEL (a .gguf) enables the model steps.
#   STEPS=tests,rows,flex,minf,cross bash benchmarks/run_gpu_session2.sh
#   STEPS=fidelity,train,headmask,eval MODEL=/root/m/smollm2.gguf bash benchmarks/run_gpu_session2.sh
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-tests,rows,flex,minf,cross}
MODEL=${MODEL:-}
source "$(dirname "$0")/gpu_steps.sh"
step tests 150 python3 -m pytest -q -x -m gpu tests/test_kernels.py tests/test_estimate.py tests/test_flexprefill.py tests/test_minference.py
step flex 150 python3 benchmarks/bench_flexprefill.py --out "$OUT/flexprefill.json"
step minf 150 python3 benchmarks/bench_minference.py --out "$OUT/minference.json"
step methods 200 python3 -m sparseattn.cli bench methods --lengths 32768,131072 --out "$OUT/results"
step cross 240 python3 benchmarks/crossover.py --out "$OUT/crossover.json"
if [[ -n $MODEL ]]; then
  export SPARSEATTN_DEFAULT_MODEL=$MODEL
  step fidelity 150 python3 benchmarks/xattn_fidelity.py --length 8192 --out "$OUT/xattn-fidelity-8k.json"
  step train 330 bash -c "python3 benchmarks/train_prulong_gpu.py --out $OUT/prulong"
  step headmask 200 bash -c "python3 benchmarks/headmask_gpu.py --mask $OUT/prulong/head_mask.tsv --out $OUT/headmask.json"
  step eval 480 bash benchmarks/eval_gpu.sh
  step demo 200 python3 -m sparseattn.cli demo --context 7936 --json "$OUT/demo.json"
fi
printf '%s\n' "${summary[@]}"

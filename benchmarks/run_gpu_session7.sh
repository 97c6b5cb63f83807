#!/usr/bin/env bash
# Device calls of session 7: each step under its own time limit, everything under $OUT, short
# tables last. STEPS picks steps (comma-separated).
#   STEPS=covtests,xattn bash benchmarks/run_gpu_session7.sh
set -uo pipefail
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-covtests,xattn}
source "$(dirname "$0")/gpu_steps.sh"
# The coverage kernel and the estimation (split head dim included) compiled, on CUDA tensors;
# the gpu-marked ones at 32K-128K.
step covtests 300 python3 -m pytest -q tests/test_coverage.py tests/test_estimate.py
# Estimation + selection + attention at 32K and 128K, the sort rule beside the kernel, the tile
# sweep (split head dim) and the threshold sweep.
step xattn 420 python3 benchmarks/bench_xattention.py --lengths 32768,131072 --sweep \
  --tau-sweep 0.8,0.85,0.9,0.95 --out "$OUT/xattention.json"
step xattn-seedL 300 python3 benchmarks/bench_xattention.py --lengths 131072 --strides 16 --seed -1 \
  --no-reference --fidelity-max-len 0 --tau-sweep 0.7,0.75,0.8,0.85,0.9,0.95 --out "$OUT/xattention-seedL.json"
step methods 420 python3 -m sparseattn.cli bench methods --out "$OUT/methods"
printf '%s\n' "${summary[@]}"

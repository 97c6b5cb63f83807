#!/usr/bin/env bash
# Device calls of session 6: each step under its own time limit, everything under $OUT, short
# tables last. STEPS picks steps (comma-separated).
#   STEPS=headmask,locality bash benchmarks/run_gpu_session6.sh
set -uo pipefail
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-headmask}
LOCALITY_ARGS=${LOCALITY_ARGS:-}
source "$(dirname "$0")/gpu_steps.sh"
step hmtests 200 python3 -m pytest -q tests/test_headmask.py
step headmask 240 python3 benchmarks/profile_headmask_prefill.py --out "$OUT/headmask-profile.json"
step locality 330 python3 benchmarks/bench_block_locality.py --out "$OUT/block-locality.json" $LOCALITY_ARGS
# The interpreter's kernel tests, on the GPU in bf16/fp16 (both program orders, gradients, varlen).
step gradtests 240 python3 -m pytest -q tests/test_kernels.py -k "gradients or varlen or transposes or deterministic \
or config_override or vertical_slash or sparse_forward or dense_forward or scales_and_accumulates"
step bench-kernel 330 python3 -m sparseattn.cli bench kernel --out "$OUT/bench"
step gputests 330 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_estimate.py tests/test_flexprefill.py \
  tests/test_mixed_kernel.py tests/test_minference.py
printf '%s\n' "${summary[@]}"

#!/usr/bin/env bash
# Device calls of session 14: each step under its own time limit, everything under $OUT, short
# tables last. STEPS picks steps (comma-separated); RUN names the outputs.
#   STEPS=gputests,persistent RUN=run24 bash benchmarks/run_gpu_session14.sh
set -uo pipefail
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-gputests,persistent}
RUN=${RUN:-run24}
source "$(dirname "$0")/gpu_steps.sh"
# The kernel tests on the GPU: the gpu-marked large shapes and the persistent forward's tests.
TAIL=6 step gputests ${TEST_SECS:-200} python3 -m pytest -q tests/test_kernels.py -k "${TESTS:-gpu or persistent}" -rf
# Run 24: persistent sparse forward programs against the grid kernel (128K, issue 3's input).
TAIL=30 step persistent ${BENCH_SECS:-420} python3 benchmarks/bench_persistent.py --out "$OUT/persistent-$RUN.json" \
  --densities "${DENSITIES:-0.01,0.02,0.05,0.10,0.20,0.50}" --narrow-densities "${NARROW-0.05,0.10}" \
  --variants "${VARIANTS:-grid,persistent split,persistent one loop,rows split,rows one loop}" ${BENCH_FLAGS:-}
printf '%s\n' "${summary[@]}"

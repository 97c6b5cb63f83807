#!/usr/bin/env bash
# Device calls of session 15: each step under its own time limit, everything under $OUT, short
# tables last. STEPS picks steps (comma-separated); RUN names the outputs.
#   STEPS=gputests,sums-probe RUN=run25 bash benchmarks/run_gpu_session15.sh
set -uo pipefail
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-gputests,sums-probe}
RUN=${RUN:-run25}
source "$(dirname "$0")/gpu_steps.sh"
# Run 25: the vertical and slash sums as runs of key blocks a program (NOTES.md, run 25).
TAIL=8 step gputests 300 python3 -m pytest -q -m gpu tests/test_minference.py tests/test_head_chunks.py \
  -k "${TESTS:-not embedded_model}" -rA
TAIL=20 step sums-probe 200 python3 benchmarks/probe_sums.py --out "$OUT/probe-sums-$RUN.json"
TAIL=40 step select-profile 240 python3 benchmarks/profile_minference_select.py \
  --out "$OUT/minference-select-profile-$RUN.json"
# MInference at equal fidelity (held-out calibration, extended candidates), seeds L, 1, 2, 128K.
TAIL=30 step minf-extended 560 python3 benchmarks/bench_calibrated_methods.py --length 131072 --seeds "${SEEDS:-L,1,2}" \
  --methods minference --candidates extended --out "$OUT/calibrated-minference-extended-$RUN.json"
printf '%s\n' "${summary[@]}"

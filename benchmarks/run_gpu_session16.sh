#!/usr/bin/env bash
# Device calls of session 16: each step under its own time limit, everything under $OUT, short
# tables last. STEPS picks steps (comma-separated); RUN names the outputs.
#   STEPS=gputests,sums-probe,topk-probe,select-profile RUN=run26 bash benchmarks/run_gpu_session16.sh
#   STEPS=minf-extended SEEDS=L,1 RUN=run26b bash benchmarks/run_gpu_session16.sh   (then SEEDS=2, run26c)
# (Session 15 wrote these steps and got no machine; this script replaces its run_gpu_session15.sh.)
set -uo pipefail
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-gputests,sums-probe}
RUN=${RUN:-run26}
source "$(dirname "$0")/gpu_steps.sh"
# Run 26 (NOTES.md): the runs sums kernel and the top-k kernel (both off until these tests and their
# probes pass), the mix index without a -1 memset, the calibrated bench's selection in the call (GPU
# time, and time added).
TAIL=8 step gputests 300 python3 -m pytest -q -m gpu tests/test_minference.py tests/test_head_chunks.py \
  -k "${TESTS:-not embedded_model}" -rA
TAIL=20 step sums-probe 200 python3 benchmarks/probe_sums.py --out "$OUT/probe-sums-$RUN.json"
TAIL=12 step topk-probe 150 python3 benchmarks/probe_top_sorted.py --out "$OUT/probe-top-sorted-$RUN.json"
TAIL=40 step select-profile 240 python3 benchmarks/profile_minference_select.py \
  --out "$OUT/minference-select-profile-$RUN.json"
# MInference at equal fidelity (held-out calibration, extended candidates), 128K. Each row now also
# profiles one call and times its chunks' attention alone: two seeds a call fit the 600 s limit.
TAIL=30 step minf-extended 560 python3 benchmarks/bench_calibrated_methods.py --length 131072 --seeds "${SEEDS:-L,1,2}" \
  --methods minference --candidates extended --out "$OUT/calibrated-minference-extended-$RUN.json"
printf '%s\n' "${summary[@]}"

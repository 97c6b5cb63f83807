#!/usr/bin/env bash
# Device calls of session 13: each step under its own time limit, everything under $OUT, short
# tables last. STEPS picks steps (comma-separated); RUN names the outputs.
#   STEPS=host-probe RUN=run23 bash benchmarks/run_gpu_session13.sh
set -uo pipefail
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-host-probe}
RUN=${RUN:-run23}
source "$(dirname "$0")/gpu_steps.sh"
# Run 23: where the per-head mixes' selection spends host time (cProfile with the GPU asleep).
TAIL=8 step gputests 300 python3 -m pytest -q -m gpu tests/test_minference.py tests/test_head_chunks.py \
  -k "not embedded_model" -rA
TAIL=400 step host-probe 300 python3 benchmarks/probe_select_host.py --configs "${HOST_CONFIGS:-}" \
  --out "$OUT/probe-select-host-$RUN.json"
TAIL=12 step top-k-probe 150 python3 benchmarks/probe_block_top_k.py --warps "${WARPS:-1,2,4,8}" --heads "${HEADS:-4}" \
  --out "$OUT/probe-block-top-k-$RUN.json"
TAIL=40 step select-profile 240 python3 benchmarks/profile_minference_select.py \
  --out "$OUT/minference-select-profile-$RUN.json"
TAIL=12 step call-profile 300 python3 benchmarks/profile_minference_call.py --out "$OUT/minference-call-profile-$RUN.json"
# MInference at equal fidelity (held-out calibration, extended candidates), seeds L, 1, 2, 128K.
TAIL=30 step minf-extended 560 python3 benchmarks/bench_calibrated_methods.py --length 131072 --seeds L,1,2 \
  --methods minference --candidates extended --out "$OUT/calibrated-minference-extended-$RUN.json"
printf '%s\n' "${summary[@]}"

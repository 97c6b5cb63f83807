#!/usr/bin/env bash
# Device calls of session 12: each step under its own time limit, everything under $OUT, short
# tables last. STEPS picks steps (comma-separated); RUN names the outputs.
#   STEPS=gputests,select-profile,call-profile RUN=run22 bash benchmarks/run_gpu_session12.sh
set -uo pipefail
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-gputests,select-profile,call-profile}
RUN=${RUN:-run22}
source "$(dirname "$0")/gpu_steps.sh"
# Run 22 (and 22b: mix rows filled in place, radix top-k): the vertical-slash cluster tables in two Triton launches (_cluster_scan_kernel,
# _cluster_lookup_kernel) and A-shape rows built once per shape. GPU tests of the MInference
# selection and of the peak memory at 128K, then the selection against cuDNN, whole and as run.
TAIL=8 step gputests 300 python3 -m pytest -q -m gpu tests/test_minference.py tests/test_head_chunks.py \
  -k "not embedded_model" -rA
TAIL=30 step top-k 150 python3 benchmarks/bench_block_top_k.py --warps 2,4,8 --out "$OUT/block-top-k-$RUN.json"
TAIL=12 step top-k-probe 150 python3 benchmarks/probe_block_top_k.py --out "$OUT/probe-block-top-k-$RUN.json"
TAIL=40 step select-profile 240 python3 benchmarks/profile_minference_select.py \
  --out "$OUT/minference-select-profile-$RUN.json"
TAIL=45 step call-profile 300 python3 benchmarks/profile_minference_call.py --out "$OUT/minference-call-profile-$RUN.json"
# MInference at equal fidelity (held-out calibration, extended candidates), seeds L, 1, 2, 128K.
TAIL=30 step minf-extended 560 python3 benchmarks/bench_calibrated_methods.py --length 131072 --seeds L,1,2 \
  --methods minference --candidates extended --out "$OUT/calibrated-minference-extended-$RUN.json"
printf '%s\n' "${summary[@]}"

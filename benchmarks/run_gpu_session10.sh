#!/usr/bin/env bash
# Device calls of session 10: each step under its own time limit, everything under $OUT, short
# tables last. STEPS picks steps (comma-separated).
#   STEPS=calibrated bash benchmarks/run_gpu_session10.sh
set -uo pipefail
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-calibrated}
source "$(dirname "$0")/gpu_steps.sh"
# Run 20: XAttention and MInference at equal fidelity (configs calibrated on a held-out prompt of the
# same synthetic model), 128K, seeds L, 1, 2, against cuDNN in the same process.
TAIL=40 step calibrated 590 python3 benchmarks/bench_calibrated_methods.py --length 131072 --seeds L,1,2 \
  --out "$OUT/calibrated-methods-${CAL_RUN:-run20}.json"
# Run 20c: MInference only, select / attend split, the run's candidates and the extended set.
TAIL=24 step minf-split 400 python3 benchmarks/bench_calibrated_methods.py --length 131072 --seeds L,1,2 \
  --methods minference --out "$OUT/calibrated-minference-run20c.json"
TAIL=24 step minf-extended 400 python3 benchmarks/bench_calibrated_methods.py --length 131072 --seeds L,1,2 \
  --methods minference --candidates extended --out "$OUT/calibrated-minference-extended-${EXT_RUN:-run20c}.json"
# GPU tests of MInference (selection changed in run 20e).
TAIL=6 step minf-gputests 300 python3 -m pytest -q -m gpu tests/test_minference.py tests/test_head_chunks.py -k "not embedded_model"
# Run 20d: the mixed-pattern selection's parts and top kernels.
TAIL=40 step minf-select-profile 200 python3 benchmarks/profile_minference_select.py \
  --out "$OUT/minference-select-profile-${PROF_RUN:-run20d}.json"
# Run 20g: seed 1 only (the device time left), MInference, extended candidates.
TAIL=14 step minf-seed1 300 python3 benchmarks/bench_calibrated_methods.py --length 131072 --seeds 1 \
  --methods minference --candidates extended --targets 0.9 --out "$OUT/calibrated-minference-extended-seed1-run20g.json"
printf '%s\n' "${summary[@]}"

#!/usr/bin/env bash
# One device call: GPU tests, kernel checks, the kernel speed suite and the input calibration.
# Writes everything under $OUT (JSON + logs); prints the short tables last.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-tests,check,bench,calibrate}
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
rc=0
if [[ $STEPS == *tests* ]]; then
  python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25; rc=$((rc | ${PIPESTATUS[0]}))
fi
if [[ $STEPS == *check* ]]; then
  python3 benchmarks/gpu_kernel_check.py 2>&1 | tee "$OUT/gpu_check.log" | tail -30; rc=$((rc | ${PIPESTATUS[0]}))
fi
if [[ $STEPS == *calibrate* ]]; then
  python3 benchmarks/calibrate_llm_like.py --out "$OUT/llm_like_calibration.json" 2>&1 | tail -8
fi
if [[ $STEPS == *bench* ]]; then
  python3 -m sparseattn.cli bench kernel --out "$OUT/results" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -45
fi
exit $rc

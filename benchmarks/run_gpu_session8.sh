#!/usr/bin/env bash
# Device calls of session 8: each step under its own time limit, everything under $OUT, short
# tables last. STEPS picks steps (comma-separated).
#   STEPS=wsprobe,xattn-seeds bash benchmarks/run_gpu_session8.sh
set -uo pipefail
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-wsprobe,xattn-seeds}
source "$(dirname "$0")/gpu_steps.sh"
# Triton's Hopper warp specialization on a minimal attention loop, feature by feature (run 18).
TAIL=24 step wsprobe 420 python3 benchmarks/probe_warp_specialize.py --lengths 32768,131072 \
  --out "$OUT/warp-specialize-probe-run18.json"
# XAttention's threshold sweep at 128K on two more seeds of the LLM-like input (run 18b).
for seed in 1 2; do
  step xattn-seeds 300 python3 benchmarks/bench_xattention.py --lengths 131072 --strides 16 --seed $seed \
    --no-reference --fidelity-max-len 0 --tau-sweep 0.85,0.9,0.95 --out "$OUT/xattention-seed$seed.json"
  cp "$OUT/xattn-seeds.log" "$OUT/xattn-seed$seed.log" 2>/dev/null
done
# Every method end to end at 128K on three seeds of the LLM-like input (run 18c).
step methods-seeds 560 python3 -m sparseattn.cli bench methods --lengths 131072 --seeds L,1,2 \
  --out "$OUT/methods" --name methods-seeds
# The LLM-like input's exact 90%-mass density at 128K over 12 seeds (run 18d).
TAIL=10 step calib-seeds 300 python3 benchmarks/calibrate_llm_like.py --lengths 131072 \
  --seeds L,0,1,2,3,4,5,6,7,8,9,10 --out "$OUT/llm_like_calibration-seeds.json"
# MInference's configs at 128K on seeds 1 and 2 (run 18e; seed L is minference.json, run 14).
for seed in 1 2; do
  TAIL=12 step minf-seeds 280 python3 benchmarks/bench_minference.py --lengths 131072 --seed $seed \
    --configs default,v512_s512_bs128,v512_s512,adaptive_0.01 --reference-max-len 0 \
    --out "$OUT/minference-seed$seed.json"
  cp "$OUT/minf-seeds.log" "$OUT/minference-seed$seed.log" 2>/dev/null
done
printf '%s\n' "${summary[@]}"

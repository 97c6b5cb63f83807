#!/usr/bin/env bash
# Device calls of session 5: each step under its own time limit, everything under $OUT, short
# tables last. STEPS picks steps (comma-separated). Models as in run_gpu_session3.sh (its `models`
# step assembles /root/m/smollm2.gguf from the carried parts).
#   STEPS=smoke,gradtests,mixedtests bash benchmarks/run_gpu_session5.sh
set -uo pipefail
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-gputests}
SA="python3 -m sparseattn.cli"
export SPARSEATTN_DEFAULT_MODEL=/root/m/smollm2.gguf
source "$(dirname "$0")/gpu_steps.sh"
# Small shapes first, before anything long.
step smoke 240 python3 -m pytest -q -x tests/test_kernels.py tests/test_estimate.py -k "config_override or \
block_mass_matches_reference or varlen or non_contiguous"
step gputests 330 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_estimate.py tests/test_flexprefill.py tests/test_mixed_kernel.py \
  tests/test_minference.py
# The interpreter's kernel tests, on the GPU in bf16/fp16 (both program orders, gradients, varlen).
step gradtests 240 python3 -m pytest -q tests/test_kernels.py -k "gradients or varlen or transposes or deterministic \
or config_override or vertical_slash or sparse_forward or dense_forward or scales_and_accumulates"
step mixedtests 240 python3 -m pytest -q tests/test_mixed_kernel.py tests/test_training.py -k "mixed or varlen_attention"
step bench-kernel 330 $SA bench kernel --out "$OUT/bench"
step bench-methods 200 $SA bench methods --lengths 32768,131072 --out "$OUT/bench"
step bench-xattn 300 python3 benchmarks/bench_xattention.py --out "$OUT/xattention.json"
step bench-minf 420 python3 benchmarks/bench_minference.py --lengths 32768,131072 \
  --configs default,v512_s512_bs128,adaptive_0.01,v512_s512 --sweep-kernel --out "$OUT/minference.json"
step overhead 200 python3 benchmarks/mixed_attention_overhead.py --profile --out "$OUT/mixed-overhead.json"
step timing 400 python3 benchmarks/train_prulong_gpu.py --skip-train --skip-eval --out "$OUT/prulong-timing"
step prulong 560 python3 benchmarks/train_prulong_gpu.py --out "$OUT/prulong"
printf '%s\n' "${summary[@]}"

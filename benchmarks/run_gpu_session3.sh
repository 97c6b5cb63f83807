#!/usr/bin/env bash
# Device calls of session 3: each step under its own time limit, everything under $OUT, short
# tables last. STEPS picks steps (comma-separated). The models are assembled once per machine from
# parts carried in earlier calls (see the developers' guide): SmolLM2 at /root/m/smollm2.gguf, Gemma 3
# 270M at /root/m/gemma.gguf.
#   STEPS=models,gemma-demo,profile,flextest,fidelity,memory,viz bash benchmarks/run_gpu_session3.sh
#   STEPS=eval-smollm2 bash benchmarks/run_gpu_session3.sh
#   STEPS=eval-gemma bash benchmarks/run_gpu_session3.sh
set -uo pipefail
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-models}
SA="python3 -m sparseattn.cli"
SMOL=/root/m/smollm2.gguf GEMMA=/root/m/gemma.gguf
export SPARSEATTN_DEFAULT_MODEL=$SMOL
source "$(dirname "$0")/gpu_steps.sh"
assemble() {  # SmolLM2 from blobs 0-1, Gemma once all six blobs are there
  [[ -f $SMOL && ( -f $GEMMA || ! -f /root/m/blob_05 ) ]] && return 0
  cat /root/m/blob_0* > /root/m/all && head -c 98362432 /root/m/all > $SMOL
  [[ -f /root/m/blob_05 ]] && tail -c +98362433 /root/m/all > $GEMMA
  rm /root/m/all; sha256sum /root/m/*.gguf
  echo "smollm2 expected b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
  echo "gemma expected a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
}
[[ ",$STEPS," == *",models,"* ]] && assemble
step gemma-demo 240 bash -c "$SA demo --model $GEMMA --context 8192 --json $OUT/demo-gemma3-8192.json \
  && $SA demo --model $GEMMA --context 32000 --json $OUT/demo-gemma3-32000.json"
step profile 240 python3 benchmarks/train_prulong_gpu.py --skip-train --skip-eval --profile --timing-steps 5 \
  --out "$OUT/prulong-profile"
step gputests 330 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_estimate.py tests/test_flexprefill.py \
  tests/test_minference.py
# The interpreter's gradient tests, on the GPU in bf16/fp16 (split dK/dV lists, varlen, key-major cache).
step gradtests 200 python3 -m pytest -q tests/test_kernels.py -k "gradients or varlen or transposes or deterministic"
step timing 200 python3 benchmarks/train_prulong_gpu.py --skip-train --skip-eval --timing-steps 10 --out "$OUT/prulong-timing"
step bench-kernel 330 $SA bench kernel --out "$OUT/bench"
step bench-methods 200 $SA bench methods --lengths 32768,131072 --out "$OUT/bench"
step flextest 120 python3 -m pytest -q -m gpu tests/test_flexprefill.py -k embedded_model
step fidelity 75 $SA fidelity --model default --length 7936 --out "$OUT/fidelity-smollm2"
step memory 60 $SA memory --model default --lengths 8192 --out "$OUT/memory-smollm2"
step viz 200 bash -c "for m in ${VIZ_METHODS:-xattention flexprefill minference streaming}; do $SA viz --model default --method \$m \
  --layer 15 --head 0 --length 7936 --out $OUT/viz/\$m-layer15-head0.png || exit 1; done"
step eval-smollm2 520 bash -c "$SA eval --model default --lengths 7936 --samples ${SAMPLES:-3} --out $OUT/eval-smollm2; \
  $SA eval --report-only --out $OUT/eval-smollm2"
step eval-gemma 470 bash -c "$SA eval --model $GEMMA --lengths 32640,16384,8192 --samples 1 --out $OUT/eval-gemma3; \
  $SA eval --report-only --out $OUT/eval-gemma3"
step memory-gemma 100 $SA memory --model $GEMMA --lengths 8192,16384,32768 --out "$OUT/memory-gemma3"
for f in "$OUT"/eval-*/results.md "$OUT"/fidelity-*/fidelity.md "$OUT"/memory-*/memory.md; do
  [[ -f $f ]] && { echo; echo "### $f"; head -16 "$f"; }
done
printf '%s\n' "${summary[@]}"

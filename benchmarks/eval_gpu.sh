#!/usr/bin/env bash
# Accuracy, perplexity, fidelity and memory of the real models on one GPU; everything under $OUT, the
# short tables printed last. Three device calls, each well inside the 10-minute limit:
#   OUT=... bash benchmarks/eval_gpu.sh                                 # SmolLM2 eval, about 7 min
#   STEPS=fidelity,memory,viz OUT=... bash benchmarks/eval_gpu.sh      # SmolLM2, about 3 min
#   STEPS=gemma GEMMA3_MODEL=/path/to/gemma-3-270m.gguf OUT=... bash benchmarks/eval_gpu.sh   # about 6 min
# SmolLM2-135M (embedded): eval at 7936 and 4096 tokens (7936 + the longest answer fit its 8192
# positions), dense (SDPA) and every method at its library defaults, min_sparse_len=0 (every prefill
# sparse), SAMPLES prompts per task and length (default 2); fidelity heatmaps at 7936; peak prefill
# memory at 8192 (eager, SDPA, each method); selection pictures. Gemma 3 270M: eval at 32640 / 16K /
# 8K, memory at 8K-32K. Measured on the H100 (run of 2026-11-24): ~2 s per answer (greedy decoding
# of up to 128 tokens at ~30 ms/token dominates), so 2 lengths x 9 tasks x 2 samples x 5 = 180 answers.
# Lengths run longest first and each step has a time limit; reports are written from whatever finished,
# and re-running with the same $OUT resumes (answers already in results.jsonl are skipped).
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-smollm2}
SAMPLES=${SAMPLES:-2}
SA=${SA:-python3 -m sparseattn.cli}
# The default model offline: a local copy, or the two parts carried in .model/ (SHA-256 checked on load).
if [[ -z "${SPARSEATTN_DEFAULT_MODEL:-}" && ! -f "${SPARSEATTN_CACHE:-$HOME/.cache/sparseattn}/SmolLM2-135M-Instruct.Q4_1.gguf" ]] \
   && compgen -G ".model/*/gguf_part_*" > /dev/null; then
  mkdir -p /tmp/sparseattn-model && cat .model/*/gguf_part_* > /tmp/sparseattn-model/SmolLM2-135M-Instruct.Q4_1.gguf
  export SPARSEATTN_DEFAULT_MODEL=/tmp/sparseattn-model/SmolLM2-135M-Instruct.Q4_1.gguf
fi
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
rc=0
step() { [[ ",$STEPS," == *",$1,"* ]]; }
run() { local name=$1 limit=$2; shift 2; echo "== $name: $*"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local s=$?
        tail -2 "$OUT/$name.log" | tr '\r' '\n' | tail -2; [[ $s -ne 0 ]] && echo "!! $name exited $s" && rc=1; return 0; }
report() { [[ -f "$1/results.jsonl" ]] && $SA eval --report-only --out "$1" > "$1/report.log" 2>&1; }

if step smollm2; then
  run eval-smollm2 420 $SA eval --model default --lengths 7936,4096 --samples "$SAMPLES" --out "$OUT/eval-smollm2"
  report "$OUT/eval-smollm2"
fi
if step fidelity; then
  run fidelity-smollm2 75 $SA fidelity --model default --length 7936 --out "$OUT/fidelity-smollm2"
fi
if step memory; then
  run memory-smollm2 60 $SA memory --model default --lengths 8192 --out "$OUT/memory-smollm2"
fi
if step viz; then
  for m in xattention flexprefill minference streaming; do
    run "viz-$m" 25 $SA viz --model default --method "$m" --layer 15 --head 0 --length 7936 --out "$OUT/viz/$m-layer15-head0.png"
  done
fi
if step gemma && [[ -n "${GEMMA3_MODEL:-}" ]]; then
  run eval-gemma3 300 $SA eval --model "$GEMMA3_MODEL" --lengths 32640,16384,8192 --samples 1 --out "$OUT/eval-gemma3"
  report "$OUT/eval-gemma3"
  run memory-gemma3 90 $SA memory --model "$GEMMA3_MODEL" --lengths 8192,16384,32768 --out "$OUT/memory-gemma3"
elif step gemma; then
  echo "== gemma: skipped (set GEMMA3_MODEL to a Gemma 3 270M .gguf file or Hugging Face folder)"
fi

for f in "$OUT"/eval-*/results.md "$OUT"/fidelity-*/fidelity.md "$OUT"/memory-*/memory.md; do
  [[ -f $f ]] && { echo; echo "### $f"; head -16 "$f"; }
done
exit $rc

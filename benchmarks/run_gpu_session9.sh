#!/usr/bin/env bash
# Device calls of session 9: each step under its own time limit, everything under $OUT, short
# tables last. STEPS picks steps (comma-separated). The A/B step needs the previous kernels, made
# here and carried (.cmp is ignored):
#   mkdir -p .cmp/base && git archive <rev before run 19> sparseattn/kernels | tar -x -C .cmp/base
#   STEPS=gputests,ab bash benchmarks/run_gpu_session9.sh   (run 19f: AB_RUN=run19f, base = the commit before it)
set -uo pipefail
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-gputests,ab}
source "$(dirname "$0")/gpu_steps.sh"
# The gpu-marked tests of every kernel at 32K-128K. The two that load the embedded model are left
# out: the model is not on the machine in these calls (they ran in session 7's calls with it).
TAIL=6 step gputests 300 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_estimate.py \
  tests/test_flexprefill.py tests/test_mixed_kernel.py tests/test_minference.py -k "not embedded_model"
# Memory-bounded head chunks: chunked == whole on CUDA, and each method's peak at 128K within budget.
TAIL=12 step chunktests 300 python3 -m pytest -q -s tests/test_head_chunks.py
# The interpreter's kernel tests, on the GPU in bf16/fp16 (gradients, varlen, vertical-slash, ...).
TAIL=6 step gradtests 240 python3 -m pytest -q tests/test_kernels.py tests/test_minference.py -k "gradients or \
varlen or transposes or deterministic or config_override or vertical_slash or sparse_forward or dense_forward \
or scales_and_accumulates"
# Run 19: this tree's kernels against the previous commit's, same process, beside cuDNN.
TAIL=22 step ab 420 python3 benchmarks/bench_kernel_ab.py --base .cmp/base/sparseattn/kernels \
  --out "$OUT/kernel-ab-${AB_RUN:-run19}.json"
# The kernel suite (README table) and every method on three seeds, after the change.
TAIL=30 step bench-kernel 420 python3 -m sparseattn.cli bench kernel --out "$OUT/bench"
TAIL=30 step methods-seeds 560 python3 -m sparseattn.cli bench methods --lengths 131072 --seeds L,1,2 \
  --out "$OUT/bench" --name methods-seeds
# Run 19c: tile configs after the change: 64-row blocks (block-sparse and vertical-slash), sparse dQ stages.
TAIL=16 step sweep-narrow 300 python3 benchmarks/sweep_kernel_configs.py --lengths 131072 --block-size 64 \
  --skip-backward --sparse-backward --backward-length 32768 --out "$OUT/sweep-narrow-run19.json"
TAIL=30 step minf-sweep 300 python3 benchmarks/bench_minference.py --lengths 131072 --configs default,v512_s512 \
  --sweep-kernel --reference-max-len 0 --out "$OUT/minference-sweep-run19.json"
# Run 19d: where the head chunks' time goes (whole vs chunked, per-chunk parts, host time, sync check).
TAIL=10 step chunk-cost 300 python3 benchmarks/bench_head_chunks.py --out "$OUT/head-chunks-${CHUNK_RUN:-run19}.json"
# Run 19g: XAttention's threshold sweep at 128K on seeds L (-1), 1 and 2 after run 19f.
for seed in -1 1 2; do
  TAIL=8 step xattn-seeds 200 python3 benchmarks/bench_xattention.py --lengths 131072 --strides 16 --seed $seed \
    --no-reference --fidelity-max-len 0 --tau-sweep 0.85,0.9,0.95 --out "$OUT/xattention-run19g-seed$seed.json"
  cp "$OUT/xattn-seeds.log" "$OUT/xattention-run19g-seed$seed.log" 2>/dev/null
done
# Run 19e: Nsight Compute on one launch per case (dense mode, every block through the index, random
# 5% and 20%): throughput, memory hierarchy, warp stalls. CSV per case under $OUT/ncu/.
mkdir -p "$OUT/ncu"
NCU="ncu --profile-from-start off --kernel-name regex:_fwd_kernel --section SpeedOfLight --section MemoryWorkloadAnalysis \
  --section WarpStateStats --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis --csv --page details"
for c in "dense 1" "every 1" "random 0.05" "random 0.20"; do
  set -- $c
  TAIL=3 step ncu 240 bash -c "$NCU python3 benchmarks/profile_sparse_forward.py --case $1 --density $2 > $OUT/ncu/$1-$2.csv"
done
printf '%s\n' "${summary[@]}"

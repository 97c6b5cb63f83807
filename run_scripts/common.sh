# Shared by prulong_masksonly.sh, prulong_masksandweights.sh and sft.sh (sourced, not run).
#
# Every knob is an environment variable; the calling script sets its mode's defaults first. Arguments
# after the script name go to `python -m sparseattn.training.train` unchanged (e.g. --report_to tensorboard,
# --logging_steps 10). Re-running a command resumes from the last checkpoint in OUT (--resume_from_checkpoint auto).
#
#   MODEL [default]                 embedded SmolLM2-135M-Instruct; an HF folder; a .gguf; tiny-random (CI)
#   SEQ_LEN [8192]                  tokens per packed row
#   BSZ [1]                         rows per device per micro-step (packed into one row of BSZ x SEQ_LEN)
#   ACCU [1]                        gradient-accumulation steps
#   STEPS [500]                     optimizer steps
#   LR [1e-5]                       learning rate of the weights (modes that train them)
#   LR_SCHEDULER [cosine]           schedule of the weights' learning rate (gates and lambdas: constant)
#   WARMUP [0.05]                   warmup of the weights' learning rate (a ratio < 1, or steps)
#   START_HEAD_SPARSITY [0.0]       target sparsity at step 0
#   END_HEAD_SPARSITY [0.5]         target sparsity after SPARSITY_WARMUP_RATIO of the steps
#   SPARSITY_WARMUP_RATIO [0.5]     fraction of steps over which the target rises
#   WARMUP_TYPE [linear]            linear | logarithmic
#   MASK_LEARNING_RATE [0.05]       learning rate of the gates (log_alpha)
#   REG_LEARNING_RATE [4.0]         learning rate of lambda1, lambda2 (gradient ascent)
#   DISABLE_LINEAR_REG_TERM [false] freeze lambda1 at 0 (quadratic penalty only)
#   SINK_SIZE [128]                 sink tokens of a streaming head
#   CONTEXT_WINDOW_IF_TOGGLED [1024] local window of a streaming head
#   BLOCK_SIZE [64]                 block size of the streaming pattern
#   SEQ_PARALLEL_SIZE [1]           sequence-parallel degree: processes that split each row (Ulysses); must divide
#                                   NPROC, which runs NPROC / SEQ_PARALLEL_SIZE data-parallel replicas
#   TRAIN_FILES []                  space-separated text/.jsonl/.json/.parquet files or folders; empty = synthetic
#   SYNTHETIC_NEEDLES [4]           passkeys per synthetic row (1..N)
#   SAVE_STEPS [100]                checkpoint every N steps
#   GC [0]                          1 = gradient checkpointing
#   FSDP [0]                        1 = FSDP full_shard auto_wrap (multi-GPU)
#   BF16 [1 with a GPU, else 0]     bf16 autocast
#   DTYPE [auto]                    weights dtype (auto: bfloat16 for masks_only on a GPU, else float32)
#   NPROC [number of GPUs, or 1]    processes (torchrun --nproc_per_node)
#   SEED [42]
#   OUT [checkpoints/<run name>]    output folder
#   PYTHON [python]

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

model=${MODEL:-default}
seq_len=${SEQ_LEN:-8192}
bsz=${BSZ:-1}
accu=${ACCU:-1}
steps=${STEPS:-500}
lr=${LR:-1e-5}
lr_scheduler=${LR_SCHEDULER:-cosine}
warmup=${WARMUP:-0.05}
start_head_sparsity=${START_HEAD_SPARSITY:-0.0}
end_head_sparsity=${END_HEAD_SPARSITY:-0.5}
sparsity_warmup_ratio=${SPARSITY_WARMUP_RATIO:-0.5}
warmup_type=${WARMUP_TYPE:-linear}
mask_learning_rate=${MASK_LEARNING_RATE:-0.05}
reg_learning_rate=${REG_LEARNING_RATE:-4.0}
disable_linear_reg_term=${DISABLE_LINEAR_REG_TERM:-false}
sink_size=${SINK_SIZE:-128}
context_window_if_toggled=${CONTEXT_WINDOW_IF_TOGGLED:-1024}
block_size=${BLOCK_SIZE:-64}
seq_parallel_size=${SEQ_PARALLEL_SIZE:-1}
train_files=${TRAIN_FILES:-}
synthetic_needles=${SYNTHETIC_NEEDLES:-4}
save_steps=${SAVE_STEPS:-100}
gc=${GC:-0}
fsdp=${FSDP:-0}
seed=${SEED:-42}
dtype=${DTYPE:-auto}
python=${PYTHON:-python}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L | wc -l)
else
    gpus=0
fi
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    gpus=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
fi
nproc=${NPROC:-$(( gpus > 0 ? gpus : 1 ))}
bf16=${BF16:-$(( gpus > 0 ? 1 : 0 ))}

# launch MODE RUN_NAME [extra train.py arguments...]
launch() {
    local mode=$1 run_name=$2
    shift 2
    local out=${OUT:-$root/checkpoints/$run_name}
    local args=(
        --mode "$mode"
        --model_name_or_path "$model"
        --model_dtype "$dtype"
        --output_dir "$out"
        --run_name "$run_name"
        --seq_len "$seq_len"
        --per_device_train_batch_size "$bsz"
        --gradient_accumulation_steps "$accu"
        --max_steps "$steps"
        --learning_rate "$lr"
        --lr_scheduler_type "$lr_scheduler"
        --warmup_steps "$warmup"
        --weight_decay 0.1
        --adam_beta2 0.95
        --max_grad_norm 1.0
        --start_head_sparsity "$start_head_sparsity"
        --end_head_sparsity "$end_head_sparsity"
        --sparsity_warmup_ratio "$sparsity_warmup_ratio"
        --warmup_type "$warmup_type"
        --mask_learning_rate "$mask_learning_rate"
        --reg_learning_rate "$reg_learning_rate"
        --disable_linear_regularization_term "$disable_linear_reg_term"
        --sink_size "$sink_size"
        --context_window_if_toggled "$context_window_if_toggled"
        --streaming_block_size "$block_size"
        --seq_parallel_size "$seq_parallel_size"
        --synthetic_max_needles "$synthetic_needles"
        --save_steps "$save_steps"
        --save_total_limit 3
        --logging_steps 1
        --seed "$seed"
        --disable_tqdm true
        --resume_from_checkpoint auto
    )
    if [[ -n "$train_files" ]]; then
        # shellcheck disable=SC2206  # word splitting is the point: a space-separated list
        args+=( --train_files $train_files )
    fi
    [[ "$bf16" == 1 ]] && args+=( --bf16 )
    # Without it, processes on a CPU-only machine would each train alone (accelerate sees no GPU to pair them on).
    [[ "$gpus" == 0 ]] && args+=( --use_cpu )
    [[ "$gc" == 1 ]] && args+=( --gradient_checkpointing )
    if [[ "$fsdp" == 1 ]]; then
        args+=( --fsdp "full_shard auto_wrap" )
        # Checkpoints gather the full state dict, from which the gates and weights are written.
        export FSDP_STATE_DICT_TYPE=FULL_STATE_DICT
    fi
    if (( seq_parallel_size < 1 || nproc % seq_parallel_size != 0 )); then
        echo "SEQ_PARALLEL_SIZE ($seq_parallel_size) must divide NPROC ($nproc)" >&2
        return 1
    fi
    mkdir -p "$out"
    echo "launching $nproc process(es), sequence parallel $seq_parallel_size: $mode -> $out" >&2
    "$python" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$nproc" \
        -m sparseattn.training.train "${args[@]}" "$@"
}

#!/usr/bin/env bash
# SFT: fine-tune the weights with the head mask frozen, loss on answer tokens only (the baseline when
# HEAD_MASK is unset: every head full). Data: TRAIN_FILES with prompt/answer records (.jsonl), else synthetic
# passkey retrieval with the loss on the answers.
#   HEAD_MASK [unset]   a head-mask TSV (1 = full, 0 = streaming), e.g. from prulong_masksonly.sh
#   CHAT_TEMPLATE [0]   1 = wrap prompts in the tokenizer's chat template
# Other knobs: see common.sh. Example:
#   HEAD_MASK=checkpoints/prulong_masksonly_default_sp0.5/head_mask_sp0.5.tsv bash run_scripts/sft.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
extra=()
if [[ -n "${HEAD_MASK:-}" ]]; then
    extra+=( --head_mask "$HEAD_MASK" )
fi
if [[ "${CHAT_TEMPLATE:-0}" == 1 ]]; then
    extra+=( --chat_template )
fi
launch sft "sft_$(basename "$model")${HEAD_MASK:+_masked}" "${extra[@]}" "$@"

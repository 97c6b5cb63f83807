#!/usr/bin/env bash
# PruLong masks-only: learn which KV heads can be streaming heads (sink + local window) with the weights frozen,
# then export the layers x KV-heads mask (OUT/head_mask_sp<END_HEAD_SPARSITY>.tsv, 1 = full, 0 = streaming).
# Knobs: see common.sh. Example (the embedded model, 8K packed rows, synthetic passkey data):
#   bash run_scripts/prulong_masksonly.sh
#   END_HEAD_SPARSITY=0.7 STEPS=600 bash run_scripts/prulong_masksonly.sh --report_to tensorboard
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch masks_only "prulong_masksonly_$(basename "$model")_sp${end_head_sparsity}" "$@"

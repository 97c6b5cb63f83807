#!/usr/bin/env bash
# PruLong masks-and-weights: learn the head gates and fine-tune the weights together (weights at LR,
# gates at MASK_LEARNING_RATE, lambdas by ascent at REG_LEARNING_RATE); exports the mask like masks-only.
# Knobs: see common.sh. Example:
#   LR=1e-5 STEPS=400 bash run_scripts/prulong_masksandweights.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch masks_and_weights "prulong_masksandweights_$(basename "$model")_sp${end_head_sparsity}" "$@"

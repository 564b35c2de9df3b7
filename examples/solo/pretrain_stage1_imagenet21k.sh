#!/usr/bin/env bash
# Stage 1 of 3 (reference spec §7.2): ImageNet-21K class names (70 %) + SlimPajama text (30 %), 1525 steps,
# starting from Mistral-7B converted to SOLO (tools/convert_checkpoint.py hf-to-megatron).
#   examples/solo/pretrain_stage1_imagenet21k.sh [--dry-run] [extra pretrain_solo.py flags]
# Environment overrides: see common.sh and examples/solo/README.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STAGE=stage1
TRAIN_ITERS=${TRAIN_ITERS:-1525}                  # 195,122 packs // 128 + 1: one pass over the blend
LOAD=${LOAD:-$CKPT_ROOT/mistral-7b-solo}          # a release: weights only, iteration 0 (no --finetune needed)
SAVE=${SAVE:-$CKPT_ROOT/stage1}                   # holding a checkpoint already: resume it exactly

# Megatron-LM blend syntax, weight before prefix; weights are relative (the trainer normalises them).
# The reference split ImageNet-21K over 32 shards (≈0.0219 each, Σ 0.7006); one prefix carries the sum.
BLEND=(
    0.70 "$DATA_ROOT/imagenet21k"
    0.30 "$DATA_ROOT/slimpajama_stage1"   # a SlimPajama slice of its own per stage: no text seen twice
)

solo_main "$@"

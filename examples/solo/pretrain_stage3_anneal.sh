#!/usr/bin/env bash
# Stage 3 of 3 (reference spec §7.2): annealing on GPT-4V-captioned and instruction-style data + a 10 %
# SlimPajama slice, 300 steps, starting from the weights of stage 2's last checkpoint.
#   examples/solo/pretrain_stage3_anneal.sh [--dry-run] [extra pretrain_solo.py flags]
# Environment overrides: see common.sh and examples/solo/README.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STAGE=stage3
TRAIN_ITERS=${TRAIN_ITERS:-300}    # 38,324 packs // 128 + 1
LOAD=${LOAD:-$CKPT_ROOT/stage2}    # --finetune: stage 2's latest weights; iteration 0, fresh optimizer
SAVE=${SAVE:-$CKPT_ROOT/stage3}    # holding a checkpoint already: resume it exactly
STAGE_ARGS=(--finetune)

# Weights proportional to each dataset's packs; relative, the trainer normalises them.
BLEND=(
    0.3581 "$DATA_ROOT/allava_laion"
    0.3153 "$DATA_ROOT/slimpajama_stage3"
    0.1166 "$DATA_ROOT/allava_vflan"
    0.0940 "$DATA_ROOT/llavar"
    0.0761 "$DATA_ROOT/dvqa"
    0.0398 "$DATA_ROOT/figureqa"
)

solo_main "$@"

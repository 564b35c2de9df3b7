#!/usr/bin/env bash
# Stage 2 of 3 (reference spec §7.2): web-scale captions, rendered web pages, OCR and charts + SlimPajama,
# 3480 steps, starting from the weights of stage 1's last checkpoint.
#   examples/solo/pretrain_stage2_web.sh [--dry-run] [extra pretrain_solo.py flags]
# Environment overrides: see common.sh and examples/solo/README.md.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STAGE=stage2
TRAIN_ITERS=${TRAIN_ITERS:-3480}   # 445,565 packs / 128 (the reference ran 445,565 // 128 + 1 = 3481)
LOAD=${LOAD:-$CKPT_ROOT/stage1}    # --finetune: stage 1's latest weights; iteration 0, fresh optimizer
SAVE=${SAVE:-$CKPT_ROOT/stage2}    # holding a checkpoint already: resume it exactly
STAGE_ARGS=(--finetune)

# Weights proportional to each dataset's packs (the reference's "natural" weights); relative, the trainer
# normalises them. The reference listed shards (CapsFusion 32, WebSight 20, CC3M 9): here one prefix each.
BLEND=(
    0.4604 "$DATA_ROOT/capsfusion"
    0.2702 "$DATA_ROOT/slimpajama_stage2"
    0.1607 "$DATA_ROOT/websight"
    0.0736 "$DATA_ROOT/cc3m"
    0.0140 "$DATA_ROOT/detailed_captions"
    0.0081 "$DATA_ROOT/llavar"
    0.0065 "$DATA_ROOT/dvqa"
    0.0036 "$DATA_ROOT/ocr_vqa"
    0.0034 "$DATA_ROOT/figureqa"
)

solo_main "$@"

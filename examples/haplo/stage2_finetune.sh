#!/usr/bin/env bash
# HaploVL stage 2 (haplovl_spec.md §4.3): full fine-tuning with the next-token loss on visual instruction
# data, everything trainable, from stage 1's pre-decoder (its heads and text targets are dropped); 30K steps
# at batch 128.
#   examples/haplo/stage2_finetune.sh [--dry-run] [extra pretrain_solo.py flags]
#
# Data: LLaVA-1.5 665K (HaploVL-7B) or the 4M single-image instructions (HaploVL-8B), preprocessed with
# --image-layout haplo --input-format llava (or sft).
#
# Choices where the spec says "unknown": LR 2e-5 with 3% warm-up, cosine to 0 (LLaVA's full fine-tuning);
# per-sample loss averaging (the SFT recipe of this stack); batch 128 packs (see stage1_distill.sh).
set -euo pipefail
STAGE=haplo_stage2
TRAIN_ITERS=${TRAIN_ITERS:-30000}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-128}
LR=${LR:-2e-5}
MIN_LR=${MIN_LR:-0}
LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-900}
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
LOAD=${LOAD:-$CKPT_ROOT/haplo_stage1}   # --finetune: stage 1's weights only (no heads, no teacher)
SAVE=${SAVE:-$CKPT_ROOT/haplo_stage2}
STAGE_ARGS=("${HAPLO_ARGS[@]}" --finetune --loss-averaging sample)
BLEND=(1.0 "$DATA_ROOT/haplo_instructions")

solo_main "$@"

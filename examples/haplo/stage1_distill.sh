#!/usr/bin/env bash
# HaploVL stage 1 (haplovl_spec.md §4.2): distil the pre-decoder from a frozen CLIP-ViT-L/14-336 (run in the
# training step on every 336-px tile) and the LLM's frozen input embeddings; 40K steps at batch 256.
#   examples/haplo/stage1_distill.sh [--dry-run] [extra pretrain_solo.py flags]
#
# Data (one --image-layout haplo prefix each, tools/preprocess_mm_data.py): LLaVA-1.5's 665K instructions
# and 558K captions arranged as interleaved sequences, plus text-only data (dolphin, Alpaca, ShareGPT).
# Weights: proportional to their sizes (the spec gives none). The release in LOAD holds the pre-decoder
# (from CLIP, haplo/clip.py), the LLM and its input embedding as llm_embedding.weight (the text targets).
#
# Choices where the spec says "unknown" (each overridable): LR 1e-4 with 1000 warm-up steps, cosine to 1e-5
# (the pre-decoder starts from CLIP's weights: a fine-tuning rate); linear heads; CLIP's last layer as the
# target (TEACHER_LAYER=-2: LLaVA's penultimate); batch 256 *packs* of 6144 tokens (the paper's 256 is
# samples; set GLOBAL_BATCH_SIZE from the prefixes' documents/packs to match it).
# One pipeline stage by default; PP>1 splits the pre-decoder's layers over the stages (the LLM does not run in
# stage 1).
set -euo pipefail
STAGE=haplo_stage1
TRAIN_ITERS=${TRAIN_ITERS:-40000}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-256}
LR=${LR:-1e-4}
MIN_LR=${MIN_LR:-1e-5}
LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-1000}
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
TEACHER=${TEACHER:-$CKPT_ROOT/clip-vit-large-patch14-336}   # a local HF CLIP directory; nothing is downloaded
TEACHER_LAYER=${TEACHER_LAYER:--1}
LOAD=${LOAD:-$CKPT_ROOT/haplo_release}
SAVE=${SAVE:-$CKPT_ROOT/haplo_stage1}
STAGE_ARGS=("${HAPLO_ARGS[@]}" --finetune --distill-teacher "$TEACHER" --distill-teacher-layer "$TEACHER_LAYER")
SOLO_SHOWN_VARS+=(TEACHER TEACHER_LAYER)
BLEND=(
    0.45 "$DATA_ROOT/haplo_llava665k"
    0.38 "$DATA_ROOT/haplo_lcs558k"
    0.17 "$DATA_ROOT/haplo_text"
)

solo_main "$@"

#!/usr/bin/env bash
# Instruction tuning after stage 3 (reference spec §8.3), in this stack: SOLO's released SFT recipe
# (HF + Accelerate + DeepSpeed, batch 1, no packing) translated into packed Megatron training.
#   examples/solo/sft.sh [--dry-run] [extra pretrain_solo.py flags]
#
# Data: the released SFT set (all_data.jsonl + images/) preprocessed once, each sample cut at the recipe's
# 4096 tokens (counted in sft.stats.json, listed in sft.errors.jsonl), packed into SEQ_LENGTH-token packs:
#   python tools/preprocess_mm_data.py --input all_data.jsonl --input-format sft --image-root images \
#       --max-sample-length 4096 --output-prefix $DATA_ROOT/sft
#
# The recipe → here:
#   AdamW lr 1e-5, weight decay 0.05, linear decay → the same (decay to 0; no decay on norms and biases,
#     megatron-core's parameter groups, where the recipe decayed everything);
#   warm-up "50" scheduler steps, which Accelerate stepped 8× per update (≈ 6 updates) → LR_WARMUP_ITERS=6;
#   1 epoch, gradient clip 1.0, bf16 → the same;
#   loss: each sample's mean over its answer tokens, then the mean over samples → --loss-averaging sample,
#     exact however samples are packed;
#   global batch 512 samples (8 GPUs × 1 × 64 accumulation) → GLOBAL_BATCH_SIZE packs per step, with
#     packs ≈ 512 / (samples per pack). Samples per pack and the epoch's length come from the prefix's
#     stats (documents / packs); without them (a dry run away from the data) the defaults assume 16 samples
#     per 32K pack (≈ 2K tokens each): 32 packs per step, 2207 steps (1.13M samples / 512).
# Environment overrides: see common.sh and examples/solo/README.md (GLOBAL_BATCH_SIZE and TRAIN_ITERS win
# over the derived values).
set -euo pipefail
SFT_DIR=$(dirname "${BASH_SOURCE[0]}")
LR=${LR:-1e-5}
MIN_LR=${MIN_LR:-0}
LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-6}
WEIGHT_DECAY=${WEIGHT_DECAY:-0.05}
SAVE_INTERVAL=${SAVE_INTERVAL:-100}
USER_GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-}
USER_TRAIN_ITERS=${TRAIN_ITERS:-}
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$SFT_DIR/common.sh"

STAGE=sft
SFT_SAMPLES_PER_STEP=${SFT_SAMPLES_PER_STEP:-512}
LOAD=${LOAD:-$CKPT_ROOT/stage3}   # --finetune: stage 3's latest weights; iteration 0, fresh optimizer
SAVE=${SAVE:-$CKPT_ROOT/sft}      # holding a checkpoint already: resume it exactly
STAGE_ARGS=(--finetune --lr-decay-style linear --loss-averaging sample)
BLEND=(1.0 "$DATA_ROOT/sft")

# Packs per step and steps per epoch from the prefix's stats: "GBS ITERS SAMPLES_PER_PACK".
read -r DERIVED_GBS DERIVED_ITERS SAMPLES_PER_PACK < <("$PYTHON" - "$DATA_ROOT/sft.stats.json" \
    "$SFT_SAMPLES_PER_STEP" $((GPUS_PER_NODE * NNODES / (TP * PP) * MICRO_BATCH_SIZE)) <<'EOF'
import json, os, sys
path, samples, unit = sys.argv[1], int(sys.argv[2]), max(int(sys.argv[3]), 1)
stats = json.load(open(path)) if os.path.isfile(path) else {"documents": 1_130_000, "packs": 1_130_000 // 16}
per_pack = stats["documents"] / max(stats["packs"], 1)
gbs = max(unit, round(samples / per_pack / unit) * unit)  # a whole number of micro-batches on every DP rank
print(gbs, max(1, stats["packs"] // gbs), f"{per_pack:.2f}")  # one epoch: every pack once
EOF
)
if [[ ! -f $DATA_ROOT/sft.stats.json ]]; then
    echo "warning: $DATA_ROOT/sft.stats.json not found: assuming 16 samples per pack and 2207 steps" >&2
fi
GLOBAL_BATCH_SIZE=${USER_GLOBAL_BATCH_SIZE:-$DERIVED_GBS}
TRAIN_ITERS=${USER_TRAIN_ITERS:-$DERIVED_ITERS}
SOLO_SHOWN_VARS+=(GLOBAL_BATCH_SIZE SAMPLES_PER_PACK SFT_SAMPLES_PER_STEP)

solo_main "$@"

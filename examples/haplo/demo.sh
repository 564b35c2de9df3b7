#!/usr/bin/env bash
# The HaploVL CPU miniature: the paper's stage-1 ablation (spec §4.2) end to end on 2 CPU cores, all data
# made here by the demo's generator.
#
#   bash examples/haplo/demo.sh            # installs into .venv if needed; outputs in haplo_demo_run/
#   HAPLO_DEMO_DIR=/tmp/hd bash examples/haplo/demo.sh
#   bash examples/haplo/demo.sh --smoke    # a few steps of everything (what CI runs): every step connects
#
# 1. tools/make_demo_data.py: synthetic shapes (label images, caption scenes, text, SFT chats, held-out
#    questions about unseen scenes), deterministic by seed;
# 2. tools/haplo_demo.py teacher: a tiny CLIP vision tower (56-px tiles of 14-px patches, haplo-tiny's) trained
#    with a linear probe on the label images, saved with save_pretrained: the frozen stage-1 teacher;
# 3. tools/preprocess_mm_data.py --image-layout haplo --haplo-tile-size 56: labels, captions, text, SFT;
# 4. the start (START): haplo-tiny at random with the Mistral tokenizer's vocabulary (tools/haplo_demo.py
#    start); START_INIT=haplo-init: tools/convert_checkpoint.py haplo-init from a random tiny HF Mistral
#    (tools/haplo_demo.py llm), the pre-decoder at random; or START names a checkpoint to start from;
# 5. stage 1: pretrain_solo.py --distill-teacher, labels + captions + text, from START: the pre-decoder side
#    distils the teacher at image patches and the LLM's frozen embeddings at text;
# 6. stage 2 twice, the same data (SFT chats), steps, schedule and seed: --load stage 1 --finetune, and
#    --load START --finetune (no stage 1); everything trains, next-token loss on the answers;
# 7. tools/haplo_demo.py evaluate: held-out questions (count, colour, shape, relation) about unseen scenes,
#    each answered by the candidate of highest log-likelihood, both runs side by side: report.md, report.json,
#    loss_curves.png.
#
# Steps and seeds are fixed (STAGE1_ITERS, STAGE2_ITERS override the step counts).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

DEMO="haplo demo"
OUT=${HAPLO_DEMO_DIR:-$ROOT/haplo_demo_run}
VENV=${VENV:-$ROOT/.venv}
# shellcheck source=examples/demo_common.sh
. examples/demo_common.sh
demo_args "$0" 2,26 "$@"
demo_python "megatron.solo.demo, megatron.core, mistral_common, matplotlib, transformers"

# --- sizes: the full miniature, or a smoke run of a few steps -------------------------------------------
if [ "$SMOKE" = 1 ]; then
  DATA_ARGS=(--per-class 4 --heldout-per-class 1 --captions 40 --heldout-captions 6 --text-documents 20
             --sft-chats 40 --sft-heldout 4)
  TEACHER_STEPS=5; ITERS1=${STAGE1_ITERS:-6}; ITERS2=${STAGE2_ITERS:-6}; WARMUP=1; LOG=1
else
  DATA_ARGS=(--per-class 60 --heldout-per-class 4 --captions 1500 --heldout-captions 60 --text-documents 200
             --sft-chats 1500 --sft-heldout 60)
  TEACHER_STEPS=300; ITERS1=${STAGE1_ITERS:-1500}; ITERS2=${STAGE2_ITERS:-1500}; WARMUP=20; LOG=25
fi
SEQ=256; TILE=56  # haplo-tiny's tiles: 4 × 4 patches of 14 px

demo_outputs .haplo-demo HAPLO_DEMO_DIR
RAW=$OUT/raw; DATA=$OUT/data

step data "$PYTHON" tools/make_demo_data.py --out "$RAW" "${DATA_ARGS[@]}"
step teacher "$PYTHON" tools/haplo_demo.py teacher --labels "$RAW/labels" --out "$OUT/teacher" \
    --steps "$TEACHER_STEPS" --tile-size "$TILE"

preprocess() {  # name, then tools/preprocess_mm_data.py arguments
  local name=$1; shift
  "$PYTHON" tools/preprocess_mm_data.py --output-prefix "$DATA/$name" --seq-length "$SEQ" \
      --tokenizer-model "$TOKENIZER" --image-layout haplo --haplo-tile-size "$TILE" --log-interval 1000 "$@"
}
pp_labels() { preprocess labels --input "$RAW/labels/train" --class-names "$RAW/labels/classes.txt"; }
pp_captions() { preprocess captions --input "$RAW/captions/train.jsonl"; }
pp_text() { preprocess text --input "$RAW/text/corpus.jsonl" --workers 0; }
pp_sft() {
  preprocess sft --input "$RAW/sft/train.jsonl" --input-format sft --image-root "$RAW/captions" \
      --max-sample-length "$SEQ"
}
step preprocess together pp_labels pp_captions pp_text pp_sft

# The stage-1 start: a checkpoint given as START (e.g. tools/convert_checkpoint.py haplo-init's), else
# haplo-tiny at random. Stage 2 without stage 1 starts from the same one.
# START_INIT=haplo-init: tools/convert_checkpoint.py haplo-init from a random tiny HF Mistral (the stand-in
# for a pre-trained LLM; stage 1's text targets are then its input embeddings), the pre-decoder at random.
START_INIT=${START_INIT:-random}
if [ -z "${START:-}" ]; then
  START=$OUT/ckpt/start
  case $START_INIT in
    random) step start "$PYTHON" tools/haplo_demo.py start --out "$START" --tokenizer-model "$TOKENIZER" --seed 1234 ;;
    haplo-init)
      make_start() {
        "$PYTHON" tools/haplo_demo.py llm --out "$OUT/llm" --tokenizer-model "$TOKENIZER" --seed 1234
        "$PYTHON" tools/convert_checkpoint.py haplo-init --llm "$OUT/llm" --pre-decoder-init random \
            --preset haplo-tiny --tokenizer-model "$TOKENIZER" --seed 1234 --out "$START"
      }
      step start make_start ;;
    *) echo "demo.sh: START_INIT must be random or haplo-init, got $START_INIT" >&2; exit 2 ;;
  esac
fi

TRAIN=(--tokenizer-model "$TOKENIZER" --seq-length "$SEQ" --micro-batch-size 1 --global-batch-size 1
       --lr-warmup-iters "$WARMUP" --log-interval "$LOG" --num-workers 1 --save-interval 100000 --seed 1234)

# Stage 1: distillation on interleaved image-text data (labels, captions) and text, as the paper's mix.
step stage1 "$PYTHON" pretrain_solo.py "${TRAIN[@]}" --load "$START" --finetune --distill-teacher "$OUT/teacher" \
    --data-path 0.4 "$DATA/labels" 0.45 "$DATA/captions" 0.15 "$DATA/text" \
    --train-iters "$ITERS1" --lr 1e-3 --min-lr 1e-4 --weight-decay 0.01 --clip-grad 1.0 \
    --save "$OUT/ckpt/stage1" --metrics-file "$OUT/stage1.metrics.jsonl"

# Stage 2: full fine-tuning on the SFT chats, the same flags for both runs; only the start differs.
STAGE2=(--data-path "$DATA/sft" --loss-averaging sample --train-iters "$ITERS2" --lr 5e-4 --min-lr 0
        --lr-decay-style linear --weight-decay 0.05 --clip-grad 1.0)
step stage2_with_stage1 "$PYTHON" pretrain_solo.py "${TRAIN[@]}" "${STAGE2[@]}" --load "$OUT/ckpt/stage1" --finetune \
    --save "$OUT/ckpt/with_stage1" --metrics-file "$OUT/with_stage1.metrics.jsonl"
step stage2_without_stage1 "$PYTHON" pretrain_solo.py "${TRAIN[@]}" "${STAGE2[@]}" --load "$START" --finetune \
    --save "$OUT/ckpt/without_stage1" --metrics-file "$OUT/without_stage1.metrics.jsonl"

echo "haplo demo: evaluate"
"$PYTHON" tools/haplo_demo.py evaluate --questions "$RAW/sft/heldout.jsonl" --image-root "$RAW/captions" \
    --run "with stage 1" "$OUT/ckpt/with_stage1" "$OUT/with_stage1.metrics.jsonl" \
    --run "without stage 1" "$OUT/ckpt/without_stage1" "$OUT/without_stage1.metrics.jsonl" \
    --timings "$TIMINGS" --out "$OUT"

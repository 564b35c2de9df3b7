#!/usr/bin/env bash
# The embedded CPU demo: SOLO's curriculum in miniature, end to end, on 2 CPU cores in under 10 minutes.
#
#   bash examples/solo/demo.sh               # installs into .venv if needed, then runs; outputs in demo_run/
#   DEMO_DIR=/tmp/demo bash examples/solo/demo.sh
#   bash examples/solo/demo.sh --smoke       # a few steps of everything (what CI runs): connects, loss falls
#
# 1. tools/make_demo_data.py: synthetic shapes (stage 1: ImageNet-style class folders, stage 2: caption
#    JSONL, a text-only corpus, held-out images), deterministic by seed;
# 2. tools/preprocess_mm_data.py: each dataset → packed indexed binaries, with the real Mistral tokenizer;
# 3. pretrain_solo.py stage 1: labels + text, from scratch (the tiny preset);
# 4. pretrain_solo.py stage 2: captions + labels + text, loading stage 1 (--finetune);
# 5. pretrain_solo.py SFT: question-answer chats about the shapes in SOLO's released SFT layout, loading
#    stage 2, [INST] … [/INST], loss on the answers averaged per sample (--loss-averaging sample);
# 6. tools/evaluate.py: lmms-eval scores stage 1 and SFT on the local task examples/solo/lmms_tasks/solo_shapes
#    (python -m lmms_eval --model solo on a temporary HF export: held-out labels, questions, multiple choice);
# 7. tools/evaluate_demo.py: greedy generation (tools/generate.py's code) on held-out images and questions,
#    the report (demo_run/report.txt, report.json, with lmms-eval's scores) and the loss curves (loss_curves.png).
#
# Steps and seeds are fixed: another machine makes the same run up to floating-point differences.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

DEMO=demo
OUT=${DEMO_DIR:-$ROOT/demo_run}
VENV=${VENV:-$ROOT/.venv}
# shellcheck source=examples/demo_common.sh
. examples/demo_common.sh
demo_args "$0" 2,21 "$@"
demo_python "megatron.solo.demo, megatron.core, mistral_common, matplotlib, lmms_eval"

# --- sizes: the full demo, or a smoke run of a few steps ------------------------------------------
# Short packs (256 tokens): on CPU attention is a dense masked matrix, so its cost grows with the pack length;
# one pack per step: many small steps learn fastest here.
if [ "$SMOKE" = 1 ]; then
  DATA_ARGS=(--per-class 4 --heldout-per-class 1 --captions 40 --heldout-captions 6 --text-documents 40
             --sft-chats 40 --sft-heldout 4)
  ITERS1=16; ITERS2=16; ITERS3=8; WARMUP=1; LOG=1
  LMMS_QA=(--limit 8)
else
  DATA_ARGS=()
  ITERS1=2500; ITERS2=2500; ITERS3=${DEMO_SFT_ITERS:-800}; WARMUP=10; LOG=25
  LMMS_QA=()
fi
SEQ=256; GBS=1

# Each step's wall time goes to timings.txt (the report adds the evaluation's own and sums them).
demo_outputs .solo-demo DEMO_DIR

step data "$PYTHON" tools/make_demo_data.py --out "$OUT/raw" "${DATA_ARGS[@]}"

preprocess() {  # name, then tools/preprocess_mm_data.py arguments
  local name=$1; shift
  "$PYTHON" tools/preprocess_mm_data.py --output-prefix "$OUT/data/$name" --seq-length "$SEQ" \
      --tokenizer-model "$TOKENIZER" --log-interval 600 "$@"
}
pp_labels() { preprocess labels --input "$OUT/raw/labels/train" --class-names "$OUT/raw/labels/classes.txt"; }
pp_captions() { preprocess captions --input "$OUT/raw/captions/train.jsonl"; }
pp_text() { preprocess text --input "$OUT/raw/text/corpus.jsonl" --workers 0; }  # text is quick: no worker start-up
# the released SFT layout; every chat fits a pack (the real recipe cuts at 4096: examples/solo/sft.sh)
pp_sft() {
  preprocess sft --input "$OUT/raw/sft/train.jsonl" --input-format sft --image-root "$OUT/raw/captions" \
      --max-sample-length "$SEQ"
}
step preprocess together pp_labels pp_captions pp_text pp_sft

TRAIN=(--tokenizer-model "$TOKENIZER" --seq-length "$SEQ" --micro-batch-size 1 --global-batch-size "$GBS"
       --lr-warmup-iters "$WARMUP" --log-interval "$LOG" --num-workers 1 --save-interval 100000 --seed 1234)

step stage1 "$PYTHON" pretrain_solo.py "${TRAIN[@]}" --model-preset tiny \
    --data-path 0.85 "$OUT/data/labels" 0.15 "$OUT/data/text" \
    --train-iters "$ITERS1" --lr 6e-4 --min-lr 1e-4 --decoupled-lr 4e-3 --decoupled-min-lr 4e-4 \
    --save "$OUT/ckpt/stage1" --metrics-file "$OUT/stage1.metrics.jsonl"

step stage2 "$PYTHON" pretrain_solo.py "${TRAIN[@]}" --load "$OUT/ckpt/stage1" --finetune \
    --data-path 0.6 "$OUT/data/captions" 0.25 "$OUT/data/labels" 0.15 "$OUT/data/text" \
    --train-iters "$ITERS2" --lr 8e-4 --min-lr 1e-4 --decoupled-lr 2e-3 --decoupled-min-lr 2e-4 \
    --save "$OUT/ckpt/stage2" --metrics-file "$OUT/stage2.metrics.jsonl"

# SFT, the recipe's shape in miniature (examples/solo/sft.sh): linear decay, weight decay 0.05, per-sample
# loss; a higher learning rate than its 1e-5, for a 64-wide model and 800 steps.
step sft "$PYTHON" pretrain_solo.py "${TRAIN[@]}" --load "$OUT/ckpt/stage2" --finetune \
    --data-path "$OUT/data/sft" --loss-averaging sample \
    --train-iters "$ITERS3" --lr 5e-4 --min-lr 0 --lr-decay-style linear --weight-decay 0.05 --clip-grad 1.0 \
    --save "$OUT/ckpt/sft" --metrics-file "$OUT/sft.metrics.jsonl"

# lmms-eval on the local task: stage 1 names the held-out label images (the task's first rows are the demo's
# held-out set), SFT answers the task's questions, generated and as multiple choice.
LMMS=(--include-path examples/solo/lmms_tasks --offline --batch-size 16)
lmms_stage1() {
  "$PYTHON" tools/evaluate.py --load "$OUT/ckpt/stage1" --tasks solo_shapes_label --template none \
      --limit "$(wc -l < "$OUT/raw/labels/heldout.jsonl")" "${LMMS[@]}" --output "$OUT/lmms/stage1"
}
lmms_sft() {
  "$PYTHON" tools/evaluate.py --load "$OUT/ckpt/sft" --tasks solo_shapes_qa,solo_shapes_mc \
      ${LMMS_QA[@]+"${LMMS_QA[@]}"} "${LMMS[@]}" --output "$OUT/lmms/sft"
}
step lmms together lmms_stage1 lmms_sft

EVAL=(--data "$OUT/raw" --stage1 "$OUT/ckpt/stage1" --stage2 "$OUT/ckpt/stage2" --sft "$OUT/ckpt/sft"
      --metrics "$OUT/stage1.metrics.jsonl" "$OUT/stage2.metrics.jsonl" "$OUT/sft.metrics.jsonl" --out "$OUT"
      --lmms "$OUT/lmms/stage1/results.json" "$OUT/lmms/sft/results.json")
[ "$SMOKE" = 1 ] && EVAL+=(--min-label-accuracy 0)
echo "demo: evaluate"
"$PYTHON" tools/evaluate_demo.py "${EVAL[@]}" --timings "$TIMINGS"  # times itself; exits 1 below the label goal

#!/usr/bin/env bash
# The paper's curriculum finding (§5.1) in miniature: stage 2 trained twice at equal compute, once from
# stage 1 (ImageNet-style labels first) and once from scratch, then both scored on held-out captions.
#
#   bash examples/solo/demo_ablation.sh                    # outputs in demo_ablation/ (ABLATION_DIR=… moves it)
#   REUSE_DEMO=demo_run bash examples/solo/demo_ablation.sh   # take the data and stage 1 of a finished demo run
#
# 1. the demo's data and stage 1 (tools/make_demo_data.py, preprocessing, 2,500 steps), unless REUSE_DEMO;
# 2. stage 2 "after stage 1": captions 85 % + text 15 %, --load stage 1 --finetune, ITERS steps;
# 3. stage 2 "from scratch": the same data, flags, steps and seed, --model-preset tiny (no stage 1);
# 4. tools/evaluate_ablation.py: held-out caption exact match and per-attribute accuracy of both, and
#    ablation_loss_curves.png (loss on caption packs and on text packs, both runs).
#
# Stage 2 here has no labels in its blend (the paper's stage 2 has no ImageNet; the demo's keeps 25 % of
# labels so that it does not forget them): the two runs differ only in where they start.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${ABLATION_DIR:-$ROOT/demo_ablation}
ITERS=${ITERS:-2500}
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import megatron.solo.demo, megatron.core, matplotlib" 2>/dev/null; then
  PYTHON=$ROOT/.venv/bin/python   # demo.sh installs it
  [ -x "$PYTHON" ] || { echo "demo_ablation.sh: run examples/solo/demo.sh once first (it installs .venv)" >&2; exit 2; }
fi
SEQ=256
DEMO=ablation
# shellcheck source=examples/demo_common.sh
. examples/demo_common.sh
demo_outputs .solo-demo ABLATION_DIR

WARMUP=$((ITERS < 100 ? 1 : 10))  # (a few-step check run: ITERS=4)
TRAIN=(--tokenizer-model "$TOKENIZER" --seq-length "$SEQ" --micro-batch-size 1 --global-batch-size 1
       --lr-warmup-iters "$WARMUP" --log-interval 25 --num-workers 1 --save-interval 100000 --seed 1234)

if [ -n "${REUSE_DEMO:-}" ]; then
  SRC=$(cd "$REUSE_DEMO" && pwd)
  [ -f "$SRC/ckpt/stage1/latest_checkpointed_iteration.txt" ] || { echo "demo_ablation.sh: $SRC has no stage 1" >&2; exit 2; }
  RAW=$SRC/raw; DATA=$SRC/data; STAGE1=$SRC/ckpt/stage1
else
  RAW=$OUT/raw; DATA=$OUT/data; STAGE1=$OUT/ckpt/stage1
  step data "$PYTHON" tools/make_demo_data.py --out "$RAW"
  preprocess() {
    local name=$1; shift
    "$PYTHON" tools/preprocess_mm_data.py --output-prefix "$DATA/$name" --seq-length "$SEQ" \
        --tokenizer-model "$TOKENIZER" --log-interval 600 "$@"
  }
  preprocess_all() {
    preprocess labels --input "$RAW/labels/train" --class-names "$RAW/labels/classes.txt"
    preprocess captions --input "$RAW/captions/train.jsonl"
    preprocess text --input "$RAW/text/corpus.jsonl" --workers 0
  }
  step preprocess preprocess_all
  step stage1 "$PYTHON" pretrain_solo.py "${TRAIN[@]}" --model-preset tiny \
      --data-path 0.85 "$DATA/labels" 0.15 "$DATA/text" \
      --train-iters 2500 --lr 6e-4 --min-lr 1e-4 --decoupled-lr 4e-3 --decoupled-min-lr 4e-4 \
      --save "$STAGE1" --metrics-file "$OUT/stage1.metrics.jsonl"
fi

# Both runs: the same blend, schedule, steps and data order (same seed); only the start differs.
STAGE2=(--data-path 0.85 "$DATA/captions" 0.15 "$DATA/text" --train-iters "$ITERS"
        --lr 8e-4 --min-lr 1e-4 --decoupled-lr 2e-3 --decoupled-min-lr 2e-4)
step after_stage1 "$PYTHON" pretrain_solo.py "${TRAIN[@]}" "${STAGE2[@]}" --load "$STAGE1" --finetune \
    --save "$OUT/ckpt/after_stage1" --metrics-file "$OUT/after_stage1.metrics.jsonl"
step from_scratch "$PYTHON" pretrain_solo.py "${TRAIN[@]}" "${STAGE2[@]}" --model-preset tiny \
    --save "$OUT/ckpt/from_scratch" --metrics-file "$OUT/from_scratch.metrics.jsonl"

echo "ablation: evaluate"
"$PYTHON" tools/evaluate_ablation.py --heldout "$RAW/captions/heldout.jsonl" \
    --run "after stage 1" "$OUT/ckpt/after_stage1" "$OUT/after_stage1.metrics.jsonl" \
    --run "from scratch" "$OUT/ckpt/from_scratch" "$OUT/from_scratch.metrics.jsonl" \
    --timings "$TIMINGS" --out "$OUT"

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

SMOKE=0
for arg in "$@"; do
  case $arg in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

OUT=${DEMO_DIR:-$ROOT/demo_run}
VENV=${VENV:-$ROOT/.venv}

# --- environment: $PYTHON, python3 or .venv if one has everything, else install into .venv like CI ------
has_all() { "$1" -c "import megatron.solo.demo, megatron.core, mistral_common, matplotlib, lmms_eval" 2>/dev/null; }
for candidate in ${PYTHON:-} python3 "$VENV/bin/python"; do
  if command -v "$candidate" >/dev/null && has_all "$candidate"; then PYTHON=$candidate; break; fi
  PYTHON=
done
if [ -z "$PYTHON" ]; then
  echo "demo: installing into $VENV (torch 2.13.0 CPU, megatron-core 0.16.1, this package's demo and eval extras)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.13.0  # pinned first: the CPU wheel here (a bare torch pulls CUDA)
  "$VENV/bin/python" -m pip install -q -e ".[demo,eval]"
  # without its own requirements: they pull PyPI's torchvision (CUDA), which breaks transformers here (README)
  "$VENV/bin/python" -m pip install -q --no-deps "lmms-eval==0.7.3"
  PYTHON=$VENV/bin/python
fi
echo "demo: using $PYTHON"

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
TIMINGS=$OUT/timings.txt
step() {
  local name=$1; shift
  local t0=$SECONDS
  echo "demo: $name"
  "$@"
  echo "$name $((SECONDS - t0))" >> "$TIMINGS"
}

if [ -d "$OUT" ] && [ ! -e "$OUT/.solo-demo" ] && [ -n "$(ls -A "$OUT")" ]; then
  echo "demo.sh: $OUT exists and is not a demo output directory; refusing to replace it (set DEMO_DIR)" >&2
  exit 2
fi
rm -rf "$OUT"
mkdir -p "$OUT"
touch "$OUT/.solo-demo"
# A 64-wide model gains nothing from many threads; more than a few only contend.
CORES=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((CORES < 4 ? CORES : 4))}
TOKENIZER=$("$PYTHON" -c "from megatron.solo.tokenizer import default_tokenizer_model as m; print(m())")

step data "$PYTHON" tools/make_demo_data.py --out "$OUT/raw" "${DATA_ARGS[@]}"

preprocess() {  # name, then tools/preprocess_mm_data.py arguments
  local name=$1; shift
  "$PYTHON" tools/preprocess_mm_data.py --output-prefix "$OUT/data/$name" --seq-length "$SEQ" \
      --tokenizer-model "$TOKENIZER" --log-interval 600 "$@"
}
# In a smoke run each of these commands is mostly a Python start-up on one core: they run at once there; the
# full run keeps them one after another (its preprocessing uses every core itself). Outputs do not overlap.
together() {  # function names
  if [ "$SMOKE" != 1 ]; then
    local f; for f in "$@"; do "$f"; done
    return
  fi
  local pids=() p rc=0 f
  for f in "$@"; do "$f" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  return "$rc"
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

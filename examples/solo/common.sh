# shellcheck shell=bash
# Shared by the three stage launchers (sourced, not run): the paper's recipe (reference spec §7.1), the
# environment overrides, and solo_main, which dry-runs or launches pretrain_solo.py under torchrun.
#
# A stage launcher sets STAGE, LOAD, SAVE, TRAIN_ITERS, the blend array BLEND (W1 PREFIX1 W2 PREFIX2 ...)
# and optionally STAGE_ARGS, then calls `solo_main "$@"`. Every variable below can be overridden from the
# environment; anything after the launcher's name is appended to pretrain_solo.py's flags, and since the
# last occurrence of a flag wins, that overrides the recipe too (e.g. `--train-iters 10`).

SOLO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# Where things live.
DATA_ROOT=${DATA_ROOT:-$SOLO_ROOT/data}          # preprocessed prefixes (tools/preprocess_mm_data.py)
CKPT_ROOT=${CKPT_ROOT:-$SOLO_ROOT/checkpoints}   # converted release + one directory per stage
PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}

# Cluster shape. The paper: one node of 8 GPUs. Under SLURM the node rank comes from the task's node id.
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}

# Parallelism and batch: TP=2 × DP=4 on 8 GPUs; 128 packs of 32K tokens per step (≈4.2M token slots),
# so 32 micro-batches of 1 per data-parallel rank. DP follows from the world size; the trainer checks
# that TP×PP divides it and that the global batch splits evenly.
TP=${TP:-2}
PP=${PP:-1}
# Sequence parallelism whenever TP > 1 (SEQUENCE_PARALLEL=0 turns it off): norms and the residual stream
# are split over the TP ranks (their activation memory / TP), and each all-reduce becomes a reduce-scatter
# plus an all-gather of the same volume.
SEQUENCE_PARALLEL=${SEQUENCE_PARALLEL:-1}
SEQ_LENGTH=${SEQ_LENGTH:-32768}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-128}

# Optimiser: Adam with Megatron's defaults (the reference does not override them), cosine from 5e-5 to
# 5e-6 over the whole stage after 200 warm-up steps; every stage starts a fresh schedule.
LR=${LR:-5e-5}
MIN_LR=${MIN_LR:-5e-6}
LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-200}
WEIGHT_DECAY=${WEIGHT_DECAY:-0.1}
CLIP_GRAD=${CLIP_GRAD:-1.0}

# Full recompute in groups of 4 layers, as the reference: Mistral-7B's 32 layers make 8 whole groups at
# PP=1 (and at PP=2 or 4 too). One extra forward per step buys the activation memory of 32K-token packs.
RECOMPUTE_NUM_LAYERS=${RECOMPUTE_NUM_LAYERS:-4}
SAVE_INTERVAL=${SAVE_INTERVAL:-50}
NUM_WORKERS=${NUM_WORKERS:-8}
TENSORBOARD_ROOT=${TENSORBOARD_ROOT:-$CKPT_ROOT/tensorboard}
WANDB_PROJECT=${WANDB_PROJECT:-}   # set it (and log in to W&B) to log there as well

# One CUDA work queue: kernels run in issue order, which megatron-core's overlap of tensor-parallel
# communication with compute relies on.
export CUDA_DEVICE_MAX_CONNECTIONS=1
# On SIGTERM torchrun forwards the signal and SIGKILLs the workers after this many seconds: writing a 7B
# checkpoint can take longer than the default 30. (Read by torch releases that have
# `torchrun --shutdown-timeout`; older ones keep 30 s: see examples/solo/README.md.)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}

# The launcher's own resolved variables, printed by --dry-run.
SOLO_SHOWN_VARS=(STAGE DATA_ROOT CKPT_ROOT LOAD SAVE TRAIN_ITERS GPUS_PER_NODE NNODES NODE_RANK MASTER_ADDR
                 MASTER_PORT TP PP SEQUENCE_PARALLEL PYTHON TORCHRUN WANDB_PROJECT)

solo_main() {
    local dry_run=0
    if [[ ${1:-} == --dry-run ]]; then
        dry_run=1
        shift
    fi
    # DATA_PATH (a whitespace-separated "W1 PREFIX1 W2 PREFIX2 ...") replaces the stage's blend, e.g. to
    # list a dataset's shards one by one.
    # shellcheck disable=SC2153  # BLEND is the stage launcher's
    local -a blend=("${BLEND[@]}")
    if [[ -n ${DATA_PATH:-} ]]; then
        read -r -a blend <<<"$DATA_PATH"
    fi

    local -a args=(
        --model-preset mistral-7b   # checked against --load's architecture; lets a dry run work without it
        --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
        --use-distributed-optimizer
        --transformer-impl transformer_engine --bf16
        --recompute-granularity full --recompute-method uniform --recompute-num-layers "$RECOMPUTE_NUM_LAYERS"
        --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
        --train-iters "$TRAIN_ITERS"
        --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-iters "$LR_WARMUP_ITERS"
        --weight-decay "$WEIGHT_DECAY" --clip-grad "$CLIP_GRAD"
        --adam-beta1 0.9 --adam-beta2 0.999 --adam-eps 1e-8
        --data-path "${blend[@]}" --num-workers "$NUM_WORKERS"
        --load "$LOAD" --save "$SAVE" --save-interval "$SAVE_INTERVAL"
        --log-interval 1 --tensorboard-dir "$TENSORBOARD_ROOT/$STAGE"
    )
    if ((TP > 1 && SEQUENCE_PARALLEL)); then
        args+=(--sequence-parallel)
    fi
    if [[ -n $WANDB_PROJECT ]]; then
        args+=(--wandb-project "$WANDB_PROJECT" --wandb-exp-name "${WANDB_EXP_NAME:-solo-$STAGE}")
    fi
    args+=(${STAGE_ARGS[@]+"${STAGE_ARGS[@]}"} "$@")

    local -a launch=(
        "$TORCHRUN" --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$NODE_RANK"
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
        "$SOLO_ROOT/pretrain_solo.py" "${args[@]}"
    )
    if ((dry_run)); then
        local name
        for name in "${SOLO_SHOWN_VARS[@]}"; do
            printf '%s=%s\n' "$name" "${!name}"
        done
        printf 'command: CUDA_DEVICE_MAX_CONNECTIONS=1'
        printf ' %q' "${launch[@]}"
        printf '\n'
        # The trainer's own checks for the whole world (no GPU needed); a config error exits 2.
        exec "$PYTHON" "$SOLO_ROOT/pretrain_solo.py" "${args[@]}" --dry-run --world-size $((GPUS_PER_NODE * NNODES))
    fi
    # exec: SIGTERM from the scheduler reaches torchrun, which forwards it to the trainers (save and exit).
    exec "${launch[@]}"
}

# shellcheck shell=bash
# Shared by HaploVL's two stage launchers (sourced, not run): SOLO's launcher machinery
# (examples/solo/common.sh: environment overrides, torchrun, --dry-run) with HaploVL's recipe on top
# (haplovl_spec.md §4). Everything the spec leaves unknown is a variable here, its choice written beside it.

# The LLM: HaploVL-7B is Vicuna-7B (haplo-vicuna-7b), HaploVL-8B Llama-3-8B (haplo-llama3-8b).
HAPLO_PRESET=${HAPLO_PRESET:-haplo-vicuna-7b}
# Packs of 4096 tokens: Vicuna-7B's context. The paper's 6144 (a secondary account, §4.4) fits Llama-3-8B's
# 8192: SEQ_LENGTH=6144 with HAPLO_PRESET=haplo-llama3-8b.
SEQ_LENGTH=${SEQ_LENGTH:-4096}
# 32 accelerators of 64 GB in the paper; here 8 GPUs by default (TP=2 × DP=4 as SOLO's), full recompute.
RECOMPUTE_NUM_LAYERS=${RECOMPUTE_NUM_LAYERS:-4}
NUM_WORKERS=${NUM_WORKERS:-8}

# Defaults above and in the stage launcher are set before SOLO's (which keeps whatever is set already).
# shellcheck source-path=SCRIPTDIR source=../solo/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../solo/common.sh"

# What every HaploVL stage adds to SOLO's flags (the last occurrence of a flag wins):
# - the model preset (checked against --load's architecture);
# - the local backend: HaploVL's mask (bidirectional inside images) is not Transformer Engine's THD
#   attention (docs/architecture.md, "HaploVL"), bf16 all the same.
HAPLO_ARGS=(--model-preset "$HAPLO_PRESET" --transformer-impl local)
SOLO_SHOWN_VARS+=(HAPLO_PRESET SEQ_LENGTH GLOBAL_BATCH_SIZE LR)

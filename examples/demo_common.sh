# Sourced by examples/solo/demo.sh and examples/haplo/demo.sh: what the two CPU demos share. The caller has
# cd'd to the repository and set DEMO (its name in messages), VENV and OUT.

# The arguments: --smoke (sets SMOKE=1), --help (prints lines $2 of the script $1), nothing else.
demo_args() {
  local script=$1 help=$2 arg
  shift 2
  SMOKE=0
  for arg in "$@"; do
    case $arg in
      --smoke) SMOKE=1 ;;
      -h|--help) sed -n "${help}p" "$script"; exit 0 ;;
      *) echo "demo.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
  done
}

# PYTHON: $PYTHON, python3 or $VENV/bin/python if it imports every module named in $1 (comma-separated), else
# a fresh install into $VENV as CI does.
demo_python() {
  local modules=$1 candidate
  for candidate in ${PYTHON:-} python3 "$VENV/bin/python"; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import $modules" 2>/dev/null; then
      PYTHON=$candidate
      echo "$DEMO: using $PYTHON"
      return
    fi
  done
  echo "$DEMO: installing into $VENV (torch 2.13.0 CPU, megatron-core 0.16.1, this package's demo and eval extras)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.13.0  # pinned first: the CPU wheel here (a bare torch pulls CUDA)
  "$VENV/bin/python" -m pip install -q -e ".[demo,eval]"
  # without its own requirements: they pull PyPI's torchvision (CUDA), which breaks transformers here (README)
  "$VENV/bin/python" -m pip install -q --no-deps "lmms-eval==0.7.3"
  PYTHON=$VENV/bin/python
  echo "$DEMO: using $PYTHON"
}

# A fresh $OUT, marked with the file $1; a non-empty folder without the mark is refused ($2: the variable that
# moves it). Then the settings every step shares: TIMINGS, OMP_NUM_THREADS, TOKENIZER (Mistral-7B-v0.1's).
demo_outputs() {
  local mark=$1 variable=$2
  if [ -d "$OUT" ] && [ ! -e "$OUT/$mark" ] && [ -n "$(ls -A "$OUT")" ]; then
    echo "$DEMO: $OUT exists and is not one of its output directories; refusing to replace it (set $variable)" >&2
    exit 2
  fi
  rm -rf "$OUT"
  mkdir -p "$OUT"
  touch "$OUT/$mark"
  TIMINGS=$OUT/timings.txt
  # A 64-wide model gains nothing from many threads; more than a few only contend.
  local cores
  cores=$(nproc)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores < 4 ? cores : 4))}
  TOKENIZER=$("$PYTHON" -c "from megatron.solo.tokenizer import default_tokenizer_model as m; print(m())")
}

# Runs a named step ("$@" after the name) and appends its wall time to $TIMINGS.
step() {
  local name=$1 t0=$SECONDS
  shift
  echo "$DEMO: $name"
  "$@"
  echo "$name $((SECONDS - t0))" >> "$TIMINGS"
}

# Runs the functions named. In a smoke run each is mostly a Python start-up on one core: they run at once
# there; the full run keeps them one after another (its preprocessing uses every core itself). Outputs must not
# overlap.
together() {
  if [ "$SMOKE" != 1 ]; then
    local f
    for f in "$@"; do "$f"; done
    return
  fi
  local pids=() p rc=0 f
  for f in "$@"; do "$f" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  return "$rc"
}

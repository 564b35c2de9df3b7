#!/usr/bin/env bash
# One command that proves the GPU path (see docs/gpu_checks.md): prints one JSON report, exits 0 only if every
# check passed. On one H100/H200 inside the project's Docker image:
#   bash tests/gpu/run_checks.sh [--out report.json] [--only NAME,...]
# On a CPU machine (CI), the same code paths at tiny sizes:
#   bash tests/gpu/run_checks.sh --smoke
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONUNBUFFERED=1
# 8 minutes for everything; each pretrain_solo.py launch inside has its own, shorter timeout.
exec timeout 480 python tests/gpu/gpu_checks.py "$@"

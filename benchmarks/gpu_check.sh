#!/usr/bin/env bash
# The precision benchmark and the step profile on a CUDA GPU (full shapes, bf16): writes
# results/bench/gpu_precision.json and results/bench/gpu_profile.json in at most 8 minutes.
#
#     bash benchmarks/gpu_check.sh [OUT]          # OUT defaults to results/bench; PY picks the interpreter
#
# Refuses (exit 2) where torch sees no CUDA device. The 30-step reweighting runs behind weights_l1_bf16_vs_fp32
# need the pool: built here from ../shared/data when that is present, else that key says why it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-results/bench}
PY=${PY:-.venv/bin/python}
LIMIT_S=${LIMIT_S:-480}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

if ! command -v "$PY" >/dev/null; then
    echo "gpu_check.sh: no Python at $PY (set PY=...)" >&2
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device: torch.cuda.is_available() is False for $PY; nothing run, nothing written" >&2
    exit 2
fi
if [ ! -f data/llama3/pool/manifest.json ] && [ -d ../shared/data ]; then
    "$PY" experiments/llama3/build_pool.py --out data/llama3/pool
fi
timeout "$LIMIT_S" "$PY" -m benchmarks.run --device cuda --only precision profile --out "$OUT" --figures ''

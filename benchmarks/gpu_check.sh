#!/usr/bin/env bash
# The precision benchmark and the step profile on a CUDA GPU (full shapes, bf16), then the spread of 30-step
# reweighting runs per precision (benchmarks/reweight_spread.py, seed 0): writes results/bench/gpu_precision.json,
# gpu_profile.json and gpu_reweight_spread.json in at most 8 + 4 minutes (measured on an H200: 3 + 3).
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
REV=$(git rev-parse --short HEAD 2>/dev/null || echo "an unknown revision")
timeout "${SPREAD_LIMIT_S:-240}" "$PY" -m benchmarks.reweight_spread --seeds 0 --out "$OUT/gpu_reweight_spread.json" \
    --label "$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))'), gpu_check.sh at $REV"

#!/usr/bin/env bash
# GPU training figures (bench/gpu.py): family x method x memory tier on full-size random-init models, and SD1.5
# LoRA side by side with diffusers' example script (--peer PATH). `bench/gpu.sh --tiny` runs the same on tiny
# shapes (the test suite does, on the CPU). Writes bench/results/gpu.md, or --out FILE.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" bench/gpu.py "$@"

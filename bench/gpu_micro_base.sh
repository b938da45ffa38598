#!/usr/bin/env bash
# Train the micro base on one GPU with its own recipe at 10x the steps, judge it, and install it only if it is better.
#
# For the day a GPU is at hand (the build machines have none; 2 CPU cores bought small gains in hours,
# bench/results/micro.md). The recipe is `python -m tuner.micro.build`'s clean one (every part from random init:
# VAE on scenes + patterns, then the UNet), each stage as one process, at --steps-scale times its preset's steps
# (micro-vae 1,500 -> 15,000; micro-base 4,200 -> 42,000, batch 64). Budget: under 8 minutes on one GPU
# (not measured yet: the script prints the wall time of each stage and of the whole run).
# Then bench/micro_adherence.py judges the new model and the installed one with the same prompts and seeds, and
# `bench/micro_adherence.py --compare` decides: the new one is installed only if every adherence figure improves
# (a figure already at 1.0 must stay there; the VAE ceiling may not fall).
#
# Usage: bench/gpu_micro_base.sh [--steps-scale 10 | --steps N] [--out DIR] [--install-dir DIR]
#          [--images 8000] [--patterns 2000] [--prompts 48] [--seeds 16] [--sample-steps 25] [--ceiling-images 192]
# --steps N trains N steps per stage (the suite's test runs --steps 2 on CPU). --install-dir defaults to the
# built-in micro model (tuner/micro/weights/micro). Exit 0: installed; 3: judged and kept the installed one.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python
SCALE=10 STEPS="" OUT=/tmp/micro-gpu INSTALL="$ROOT/tuner/micro/weights/micro"
IMAGES=8000 PATTERNS=2000 PROMPTS=48 SEEDS=16 SAMPLE_STEPS=25 CEILING=192
while [ $# -gt 0 ]; do
  value=${2-}
  case "$1" in
    --steps-scale) SCALE=$value ;;
    --steps) STEPS=$value ;;
    --out) OUT=$value ;;
    --install-dir) INSTALL=$value ;;
    --images) IMAGES=$value ;;
    --patterns) PATTERNS=$value ;;
    --prompts) PROMPTS=$value ;;
    --seeds) SEEDS=$value ;;
    --sample-steps) SAMPLE_STEPS=$value ;;
    --ceiling-images) CEILING=$value ;;
    *) echo "error: unknown argument $1 (see the head of $0)" >&2; exit 2 ;;
  esac
  [ -n "$value" ] || { echo "error: $1 needs a value" >&2; exit 2; }
  shift 2
done
[ -f "$INSTALL/model_index.json" ] || { echo "error: --install-dir $INSTALL holds no installed model" >&2; exit 2; }
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ -z "$STEPS" ]; then
  read -r VAE_STEPS UNET_STEPS < <("$PY" -c "
from tuner.config import load_config
print(*(round(load_config(preset=p).train.max_train_steps * $SCALE) for p in ('micro-vae', 'micro-base')))")
else
  VAE_STEPS=$STEPS UNET_STEPS=$STEPS
fi
mkdir -p "$OUT"
started=$(date +%s)
echo "== build: micro-vae $VAE_STEPS steps, micro-base $UNET_STEPS steps, one process each, into $OUT"
"$PY" -m tuner.micro.build "$OUT" --images "$IMAGES" --patterns "$PATTERNS" --vae-steps "$VAE_STEPS" \
  --unet-steps "$UNET_STEPS" --vae-processes 1 --unet-processes 1
built=$(date +%s)
echo "== trained in $(( (built - started) / 60 )) min $(( (built - started) % 60 )) s (budget: 8 min on one GPU)"

judge() {  # judge MODEL NAME: adherence figures into $OUT/NAME.json (and a readable $OUT/NAME.md)
  "$PY" bench/micro_adherence.py --model "$1" --prompts "$PROMPTS" --seeds "$SEEDS" --steps "$SAMPLE_STEPS" \
    --ceiling-images "$CEILING" --build-dir "$OUT" --out "$OUT/$2.md" --json "$OUT/$2.json"
}
echo "== judging the installed model and the new one (same prompts, seeds and sampler)"
judge "$INSTALL" installed
judge "$OUT/micro" new
if "$PY" bench/micro_adherence.py --compare "$OUT/installed.json" "$OUT/new.json"; then
  rm -rf "$INSTALL.new"
  cp -r "$OUT/micro" "$INSTALL.new"
  rm -rf "$INSTALL.old"
  mv "$INSTALL" "$INSTALL.old" && mv "$INSTALL.new" "$INSTALL" && rm -rf "$INSTALL.old"
  echo "INSTALLED $OUT/micro as $INSTALL; its figures: $OUT/new.md (copy it to bench/results/micro.md)"
  exit 0
fi
echo "NOT INSTALLED: $OUT/micro is not better on every figure; $INSTALL is unchanged ($OUT/new.md, $OUT/installed.md)"
exit 3

#!/usr/bin/env bash
# Does the broken label catch a strong clamp's gibberish on real answers? The headline's clamp (the demo's latent and
# value, 4x the latent's max) and 2x / 4x that value: 48 seeded XSTest prompts (safe + unsafe), 64-token answers, no
# early stop, broken label on, fp32 (docs/results/broken/, docs/RESULTS.md section 0c').
#
#   scripts/broken_clamps.sh runs/headline/demo runs/broken
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?demo run folder}; OUT=${2:?output folder}
S=${SAESTEER:-.venv/bin/saesteer}
PY=${PYTHON:-.venv/bin/python}
F=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['feature'])" "$RUN/features/selection.json")
C=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['clamp'])" "$RUN/features/selection.json")
for mult in ${MULTS:-1 2 4}; do
  c=$("$PY" -c "print(round($C * $mult, 4))")
  [ -f "$OUT/x$mult/summary.json" ] || $S eval refusal --model qwen2.5-coder-0.5b-instruct --dataset xstest \
     --limit 48 --sae "$RUN/sae" --feature "$F" --clamp "$c" --max-new-tokens 64 --no-early-stop \
     --broken --batch-size 48 --dtype float32 --threads 2 --out "$OUT/x$mult"
done

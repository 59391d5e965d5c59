#!/usr/bin/env bash
# GPU check (issue 14 §5), <= 8 minutes on one CUDA GPU:
#   1. the tests marked `cuda` (bf16 / fp16 steering + generation on the GPU),
#   2. the tiny demo (`saesteer demo --budget tiny --device cuda`: every stage on the GPU),
#   3. benchmarks/generation.py on the default model in bfloat16 on the GPU,
#   4. benchmarks/train_sae.py (saesteer's trainer on the GPU) on a bf16-collected cache of the default model.
# Each step has its own `timeout`; a failed step is recorded and the others still run. JSON results go to
# benchmarks/results/gpu/ (summary.json: per step rc + seconds). Exit code: 0 only when every step passed.
#
# Needs what `make setup-dev` installs (a CUDA build of torch), the default model converted into the cache, and the
# data sets (`saesteer data fetch --all`, or SAESTEER_DATA pointing at them). PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
OUT=benchmarks/results/gpu
RUN="${RUN_DIR:-runs/gpu-check}"
M="${MODEL:-qwen2.5-coder-0.5b-instruct}"
LAYER="${LAYER:-12}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT" "$RUN"

"$PY" - <<'EOF' > "$OUT/env.json"
import json, platform, torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA GPU visible to torch (torch %s)" % torch.__version__)
p = torch.cuda.get_device_properties(0)
print(json.dumps({"gpu": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "bf16_supported": torch.cuda.is_bf16_supported(),
                  "python": platform.python_version()}, indent=2))
EOF
cat "$OUT/env.json"

declare -a SUMMARY=()
FAILED=0
step() {  # step NAME SECONDS CMD...: run under timeout, record rc and wall time, keep going on failure
  local name=$1 limit=$2 rc=0 t0=$SECONDS
  shift 2
  echo "=== $name (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  SUMMARY+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"timeout_s\": $limit}")
  if [[ $rc -ne 0 ]]; then FAILED=1; fi
}

step pytest-cuda 60 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests --junitxml="$OUT/pytest_cuda.xml"
step demo-tiny 210 "$PY" -m saesteer demo --model "$M" --layer "$LAYER" --budget tiny --device cuda --out "$RUN/demo"
if [[ -f "$RUN/demo/demo_timings.json" ]]; then cp "$RUN/demo/demo_timings.json" "$OUT/demo_timings.json"; fi
step generation-bench 100 "$PY" benchmarks/generation.py --model "$M" --layer "$LAYER" --device cuda \
  --dtype bfloat16 --skip-workers --out "$OUT/generation.json"
step collect-bf16 45 "$PY" -m saesteer collect --model "$M" --layer "$LAYER" --data wikitext2 --tokens 49152 \
  --shard-tokens 16384 --batch-size 32 --device cuda --model-dtype bfloat16 --out "$RUN/acts" --overwrite
step train-sae-bench 60 "$PY" benchmarks/train_sae.py --acts "$RUN/acts" --device cuda --steps 40 \
  --skip sparsify,saelens,e2e --out "$OUT/train_sae.json"

{
  echo "["
  for i in "${!SUMMARY[@]}"; do
    sep=","; if [[ $i -eq $((${#SUMMARY[@]} - 1)) ]]; then sep=""; fi
    echo "  ${SUMMARY[$i]}$sep"
  done
  echo "]"
} > "$OUT/summary.json"
cat "$OUT/summary.json"
exit "$FAILED"

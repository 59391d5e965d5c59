#!/usr/bin/env bash
# Issue 15 §5: the whole headline comparison from nothing, timed: `saesteer demo` (SAE, features, clamp and gated
# policies) → the baselines and the two-sided policy (scripts/baselines_demo.sh, policies only) → the full-scale
# comparison (scripts/compare_full.sh). Writes OUT/timings.json (seconds per stage, dtype, threads, CPU, load);
# every stage resumes where it stopped, so a cut run continues when started again (its timings then add up), and
# scripts/headline_timing.py adds the per-group seconds that compare stores (they survive resumes) as compare_groups.
#
#   scripts/headline.sh runs/headline
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?output folder}
S=${SAESTEER:-.venv/bin/saesteer}
PY=${PYTHON:-.venv/bin/python}
export SAESTEER_THREADS="${SAESTEER_THREADS:-2}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
mkdir -p "$OUT"
stage() {  # stage NAME COMMAND...: run it and add its wall time to OUT/timings.json
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  "$@"
  "$PY" - "$OUT/timings.json" "$name" "$t0" "$(date +%s.%N)" <<'PY'
import json, os, platform, sys, time
from pathlib import Path
import torch
path, name, t0, t1 = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
d = json.loads(path.read_text()) if path.exists() else {"stages": {}}
st = d["stages"].setdefault(name, {"seconds": 0.0, "runs": 0})
st["seconds"] = round(st["seconds"] + t1 - t0, 1)
st["runs"] += 1
d["total_seconds"] = round(sum(s["seconds"] for s in d["stages"].values()), 1)
flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
d["machine"] = {"cpus": os.cpu_count(), "threads": os.environ.get("SAESTEER_THREADS"), "avx512_bf16": "avx512_bf16" in flags,
                "cuda": torch.cuda.is_available(), "platform": platform.platform(), "load_1m_at_end": os.getloadavg()[0]}
d["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
tmp = path.with_suffix(".tmp")
tmp.write_text(json.dumps(d, indent=1) + "\n")
tmp.replace(path)
print(f"[headline] {name}: {t1 - t0:.0f} s (total so far {d['total_seconds']:.0f} s)")
PY
}
[ -f "$OUT/demo/policies/clamp+cast.json" ] || stage demo "$S" demo --model qwen2.5-coder-0.5b-instruct --out "$OUT/demo"
stage baselines env COMPARE=0 scripts/baselines_demo.sh "$OUT/demo" "$OUT/baselines"
stage compare scripts/compare_full.sh "$OUT/demo" "$OUT/baselines" "$OUT/compare-full"
"$PY" scripts/headline_timing.py "$OUT/compare-full" --into "$OUT/timings.json"

#!/usr/bin/env bash
# Issue 15's comparison at full refusal-set scale on a finished `saesteer demo` run and its baselines
# (scripts/baselines_demo.sh): every held-out test item of each refusal set (--limit 0: n = 95 / 219 / 40 unsafe,
# 137 / 40 safe; the rest of each set trained or calibrated a gate), 24 replayed conversations, 64 seeded HumanEval
# and 64 seeded GSM8K-chat problems, the prefix judge plus a calibrated model judge on a seeded 16 answers per set and
# condition, broken labels, and 24 answers per condition regenerated at 256 tokens. ~12 min per condition on 2 cores
# in bf16 (the unconditional ones longer: steered replies run to the 512-token HumanEval budget); compare resumes per
# condition and group, in the order of --policies.
#
#   scripts/compare_full.sh runs/s6b/demo runs/s6b/baselines runs/s7/compare-full
#
# The further judges are two judges of the default model fitted once on the same 400 of XSTest's human-labelled
# answers (`saesteer eval calibrate-judge`): the residual probe judge (session 15, --kind probe, fitted on whole answers
# and on their first 3 / 8 / 24 tokens, so that it reads the early-stop stubs too; ~16 min in fp32; PROBE_CAL names the
# file) and the log-odds judge (session 14, ~11 min; JUDGE_CAL; κ 0.26); each
# reads a seeded 16 answers per set and condition and the long answers. JUDGES="" leaves them out (each set a judge
# read is kept, so a later run with it resumes; a judge added after a long-answer check ran reads the stored pairs);
# JUDGES=model:hf:qwen2.5-coder-1.5b-instruct is session 13's generative judge (κ 0.12 on the long answers).
set -euo pipefail
RUN=${1:?demo run folder}; BASE=${2:?baselines folder (scripts/baselines_demo.sh)}; OUT=${3:?output folder}
S=${SAESTEER:-.venv/bin/saesteer}
P=$BASE/policies
CAL=${JUDGE_CAL:-$OUT/judge-0.5b.json}
PCAL=${PROBE_CAL:-$OUT/judge-probe-cuts-0.5b.json}
JUDGES=${JUDGES-probe:$PCAL,logit:$CAL}
for kind in probe logit; do
  f=$CAL; [ $kind = logit ] || f=$PCAL
  if [[ ",$JUDGES," == *",$kind:$f,"* && ! -f "$f" ]]; then
    mkdir -p "$(dirname "$f")"
    $S eval calibrate-judge --kind $kind --model qwen2.5-coder-0.5b-instruct --limit 400 --seed 0 --out "$f"
  fi
done
JUDGE_ARGS=()
[ -z "$JUDGES" ] || JUDGE_ARGS=(--judges "$JUDGES" --judges-limit 16)
$S compare --model qwen2.5-coder-0.5b-instruct \
   --policies "$RUN/policies/clamp.json,$P/system-prompt.json,$P/system-prompt+clamp.json,$P/direction+always.json,$P/two-sided-probe.json,$RUN/policies/clamp+probe.json,$P/direction+probe.json,$RUN/policies/clamp+cast.json" \
   --limit 0 --capability humaneval,gsm8k_chat --gsm8k-limit 64 --judge prefix \
   ${JUDGE_ARGS[@]+"${JUDGE_ARGS[@]}"} --broken --long-check 24 --long-tokens 256 \
   --multiturn-limit 24 --max-turns 3 --batch-size 64 --exclude "$RUN/features/selection.json" --out "$OUT"

#!/usr/bin/env bash
# Issue 15's baselines and a two-sided policy on a finished `saesteer demo` run, at the demo's scale (n = 24 per
# refusal set, 16 HumanEval / 16 GSM8K-chat problems, 8 replayed conversations): a first look at the acceptance line
# before the full comparison (scripts/reproduce_default.sh step 11). Gates train / calibrate on the demo's sets; the
# test items exclude everything a fit saw. The two-sided policy reads every user turn (--gate-read turns, session 11):
# a conversation is steered low only when none of its turns scores harmful.
#
#   scripts/baselines_demo.sh runs/s6b/demo runs/s6b/baselines
#   COMPARE=0 scripts/baselines_demo.sh ...   # the policies only (scripts/headline.sh: compare_full.sh compares them)
set -euo pipefail
RUN=${1:?demo run folder}; OUT=${2:?output folder}
S=${SAESTEER:-.venv/bin/saesteer}
M=qwen2.5-coder-0.5b-instruct
P=$OUT/policies
mkdir -p "$P"
TRAIN="arditi-harmful:train,arditi-harmless:train,xstest#0:0.4,jbb-harmful#0:0.4,jbb-benign#0:0.4"
VAL="arditi-harmful:val,arditi-harmless:val,xstest#0.4:0.6,jbb-harmful#0.4:0.6,jbb-benign#0.4:0.6"
SEL=$RUN/features/selection.json
D=$OUT/direction.safetensors
[ -f "$D" ] || $S direction --model $M --out "$D"
printf '{"kind": "ablate_direction", "direction": "%s"}\n' "$(realpath "$D")" > "$P/ablate-direction.json"
[ -f "$P/system-prompt.json" ] || $S policy fit --model $M --gate always --system-prompt safety --name system-prompt \
   --out "$P/system-prompt.json"
[ -f "$P/system-prompt+clamp.json" ] || $S policy fit --model $M --sae "$RUN/sae" --selection "$SEL" --gate always \
   --system-prompt safety --name system-prompt+clamp --out "$P/system-prompt+clamp.json"
[ -f "$P/direction+probe.json" ] || $S policy fit --model $M --direction "$D" --gate always,probe --gate-layer 12 \
   --fpr 0.02 --match "$RUN/policies/clamp.json" --match-strengths 0.25,0.5,1,2,4,8 --train "$TRAIN" --val "$VAL" \
   --limit 128 --cache "$RUN/gate-cache" --out "$P/direction+{gate}.json"
[ -f "$P/two-sided-probe.json" ] || $S policy fit --model $M --sae "$RUN/sae" --selection "$SEL" --gate probe \
   --gate-layer 12 --gate-read turns --fpr 0.02 --steer-low "$P/ablate-direction.json" --low-rate 0.02 --train "$TRAIN" --val "$VAL" \
   --limit 128 --cache "$RUN/gate-cache" --name two-sided-probe --out "$P/two-sided-probe.json"
[ "${COMPARE:-1}" = 0 ] && exit 0
$S compare --model $M --policies "$RUN/policies/clamp.json,$P/system-prompt.json,$P/system-prompt+clamp.json,$P/direction+always.json,$P/direction+probe.json,$RUN/policies/clamp+cast.json,$RUN/policies/clamp+probe.json,$P/two-sided-probe.json" \
   --limit 24 --capability humaneval,gsm8k_chat --gsm8k-limit 16 --multiturn-limit 8 --max-turns 3 \
   --exclude "$SEL" --out "$OUT/compare"

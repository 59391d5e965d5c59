#!/usr/bin/env bash
# Reproduce every number in README.md / docs/RESULTS.md on the default model (Qwen2.5-Coder-0.5B-Instruct, layer 12).
# These are the commands that produced them, in order (2-core CPU: many hours in all, step 11 alone ~3.5 h in fp32; set
# SAESTEER_THREADS to taste).
# Each stage writes under runs/ (git-ignored) and can be re-run alone.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 SAESTEER_THREADS="${SAESTEER_THREADS:-2}"
S=.venv/bin/saesteer
M=qwen2.5-coder-0.5b-instruct

# 1. activations: 280k tokens of the chat mix (600 Wikipedia, 700 HH-helpful chats, 160+160 prompts answered by the model)
$S collect --model $M --layer 12 --data chat-mix --tokens 280000 --batch-size 16 --context-len 256 --out runs/acts-qwen-l12
# 2. Top-k SAE, k=32, 8x (7168 latents), 3 epochs
$S train --acts runs/acts-qwen-l12 --k 32 --expansion 8 --batch-size 2048 --epochs 3 --warmup-steps 50 \
   --model $M --layer 12 --out runs/sae-qwen-l12 --checkpoint-every 100
$S sae-eval --model $M --sae runs/sae-qwen-l12 --data wikitext2 --out runs/sae-qwen-l12/eval_wikitext2.json \
   --max-docs 96 --ce-docs 24 --context-len 256 --batch-size 8
$S sae-eval --model $M --sae runs/sae-qwen-l12 --data hh-harmless --out runs/sae-qwen-l12/eval_hh_harmless.json \
   --max-docs 48 --ce-docs 8 --context-len 256 --batch-size 8
# 3. refusal features: paper candidates + contrastive ranking + clamp grid on arditi val, held-back AdvBench check
$S features --model $M --sae runs/sae-qwen-l12 --out runs/features-qwen-l12-v3 --n-archetypes 6 --n-contrast 24 \
   --n-grid 1 --features 1102,1647,3011,476 --clamp-multiples 1,2,4 --val-limit 24 --max-new-tokens 20 \
   --batch-size 32 --heldout advbench --heldout-limit 96
# 3b. the same without any hand-picked latent (session 2: selection requires a significant validation gain; it finds
#     latent 1647 at 4x max by itself; copies in docs/results/features/)
$S features --model $M --sae runs/sae-qwen-l12 --out runs/features-qwen-l12-v4 --n-archetypes 6 --n-contrast 24 \
   --n-grid 4 --n-grid-direction 2 --clamp-multiples 1,2,4 --val-limit 32 --max-new-tokens 20 --batch-size 32 \
   --heldout advbench --heldout-limit 96
# 4. policies: the paper's unconditional clamp (latent 1647 at 4x its max) and the same clamp behind three gates
P=runs/lead/policies
TRAIN="arditi-harmful:train,arditi-harmless:train,xstest#0:0.4,jbb-harmful#0:0.4,jbb-benign#0:0.4"
VAL="arditi-harmful:val,arditi-harmless:val,xstest#0.4:0.6,jbb-harmful#0.4:0.6,jbb-benign#0.4:0.6"
$S policy fit --model $M --sae runs/sae-qwen-l12 --feature 1647 --clamp 12.9207 --gate always --name clamp --out $P/clamp.json
$S policy fit --model $M --sae runs/sae-qwen-l12 --feature 1647 --clamp 12.9207 --gate probe,sae,cast --fpr 0.02 \
   --train "$TRAIN" --val "$VAL" --limit 200 --cache runs/lead/gate-cache --out "$P/clamp+{gate}.json"
# 5. the comparison table in README.md
$S compare --model $M --policies $P/clamp.json,$P/clamp+probe.json,$P/clamp+sae.json,$P/clamp+cast.json \
   --limit 30 --capability mmlu,truthfulqa_mc1 --capability-limit 24 --multiturn-limit 8 --max-turns 3 \
   --exclude runs/features-qwen-l12-v3/selection.json --out runs/lead/compare2
# 6. the clamp sweep and its report
$S sweep --model $M --sae runs/sae-qwen-l12 --features-dir runs/features-qwen-l12-v3 --feature 1647 --clamps "" \
   --relative 1,2,4 --control-clamps 6.46,12.92 --limit 16 --cap-limit 16 --capability mmlu,truthfulqa_mc1 --out runs/lead/sweep2
# 7. session 2: capability down on GSM8K with the unaided features run
$S sweep --model $M --sae runs/sae-qwen-l12 --features-dir runs/features-qwen-l12-v4 --clamps "" --relative 2,4 \
   --control -1 --limit 8 --cap-limit 16 --capability mmlu,gsm8k --gsm8k-limit 16 --out runs/s2/sweep-gsm8k
# 8. session 2: gates per layer, model judges, Crescendo with a real attacker, the timed demo
.venv/bin/python scripts/gate_layers.py --out docs/results/gate_layers.json
$S eval judges --judge prefix,model:hf:qwen2.5-coder-0.5b-instruct,model:hf:qwen2.5-coder-1.5b-instruct --limit 48 \
   --out runs/s2/judges.json
for P in "" "--policy runs/lead/policies/clamp+probe.json"; do
  $S eval multiturn --mode crescendo --limit 4 --max-turns 3 --max-backtracks 2 \
     --attacker hf:qwen2.5-coder-1.5b-instruct $P --out "runs/s2/crescendo${P:+-clamp+probe}"
done
/usr/bin/time -v make demo RUN=runs/s2/demo
# 9. session 3: the 1.5B model's residual stream as the gate (layer chosen by validation TPR), added to the comparison.
#    Policies fitted by this session's code record the chat template's ids (--chat-only, default): raw-text
#    capability contexts stay unsteered (the committed table: the four gated policies refitted from the gate cache,
#    their capability rows recomputed).
P=runs/lead/policies
SAESTEER_THREADS=2 .venv/bin/python scripts/gate_layers.py --model qwen2.5-coder-1.5b-instruct --layers 8,12,16,20 \
   --out docs/results/gate_layers_1.5b.json
$S policy fit --model $M --sae runs/sae-qwen-l12 --feature 1647 --clamp 12.9207 --gate probe --fpr 0.02 \
   --gate-model qwen2.5-coder-1.5b-instruct --gate-layer 16 --name "clamp+probe-1.5b" \
   --train "$TRAIN" --val "$VAL" --limit 200 --cache runs/lead/gate-cache --out "$P/clamp+probe-1.5b.json"
$S policy fit --model $M --sae runs/sae-qwen-l12 --feature 1647 --clamp 12.9207 --gate probe --fpr 0.02 \
   --gate-model qwen2.5-coder-1.5b-instruct --gate-layer 16 --strength linear --name "clamp+probe-1.5b-linear" \
   --train "$TRAIN" --val "$VAL" --limit 200 --cache runs/lead/gate-cache --out "$P/clamp+probe-1.5b-linear.json"
$S compare --model $M --policies $P/clamp.json,$P/clamp+probe.json,$P/clamp+sae.json,$P/clamp+cast.json,$P/clamp+probe-1.5b.json,$P/clamp+probe-1.5b-linear.json \
   --limit 30 --capability mmlu,truthfulqa_mc1 --capability-limit 24 --multiturn-limit 8 --max-turns 3 \
   --exclude runs/features-qwen-l12-v3/selection.json --out runs/lead/compare2
# 10. session 4: a search over probe variants on the 1.5B model (layers 12/16/20 alone and concatenated, C,
#     up-weighted hard benign prompts, pooled vs per-set FPR cap), chosen on validation only; the same with a
#     prompted read (the gate reads prompt + a fixed "Verdict:" prefix); the per-set-cap gate added to the comparison
#     (n = 40 per set: every held-out JBB prompt).
make setup-gate-model
.venv/bin/python scripts/gate_search.py --layers 12,16,20 --tests "xstest#0.6:1,jbb-harmful#0.6:1,jbb-benign#0.6:1" \
   --policy-cache runs/lead/gate-cache --out docs/results/gate_search_1.5b.json
.venv/bin/python scripts/gate_search.py --layers 12,16,20 --tests "xstest#0.6:1,jbb-harmful#0.6:1,jbb-benign#0.6:1" \
   --suffix "Before answering, I judge whether this request is harmful or harmless. Verdict: the request is" \
   --out docs/results/gate_search_1.5b_prompted.json
$S policy fit --model $M --sae runs/sae-qwen-l12 --feature 1647 --clamp 12.9207 --gate probe --fpr 0.02 --fpr-cap per-set \
   --C 0.03 --gate-model qwen2.5-coder-1.5b-instruct --gate-layer 16 --name "clamp+probe-1.5b-perset" \
   --train "$TRAIN" --val "$VAL" --limit 200 --cache runs/lead/gate-cache --out "$P/clamp+probe-1.5b-perset.json"
$S compare --model $M --policies $P/clamp.json,$P/clamp+probe.json,$P/clamp+sae.json,$P/clamp+cast.json,$P/clamp+probe-1.5b.json,$P/clamp+probe-1.5b-linear.json,$P/clamp+probe-1.5b-perset.json \
   --limit 40 --capability mmlu,truthfulqa_mc1 --capability-limit 24 --multiturn-limit 8 --max-turns 3 \
   --exclude docs/results/features/selection.json --out runs/lead/compare3
#     post hoc: could any threshold of the 1.5B gate meet the goal on these test items? (diagnostic, never for choosing)
.venv/bin/python scripts/gate_frontier.py --compare runs/lead/compare3 --condition clamp+probe-1.5b \
   --out docs/results/gate_frontier_1.5b.json
# 11. issue 15, the README's headline: from nothing, timed (OUT/timings.json; per-group seconds in
#     OUT/compare-full/results.jsonl): the demo (SAE, features, the clamp and its gated policies) -> the baselines and
#     the two-sided policy fitted on train / validation prompts only (scripts/baselines_demo.sh, policies only) -> the
#     full comparison (scripts/compare_full.sh: every held-out test item of each refusal set, 64 seeded HumanEval and
#     64 GSM8K-chat problems in chat format, 24 replayed conversations, the prefix judge plus the 1.5B model judge on a
#     seeded 16 answers per set and condition, broken labels, 24 answers per condition regenerated at 256 tokens).
#     goals.json gives the acceptance line per condition and criterion. Every stage resumes where it stopped.
#     Sessions 11-13, fp32 on a 2-core CPU without AVX512: see docs/RESULTS.md section 0c'.
HL=runs/headline
scripts/headline.sh $HL
mkdir -p docs/results/headline
cp $HL/compare-full/{results.jsonl,config.json,table.md,table.html,pareto.png,goals.json} $HL/timings.json \
   docs/results/headline/
#     Crescendo is not part of compare: 30 JailbreakBench objectives x 3 turns with the 1.5B attacker, unsteered, the
#     clamp and the two-sided policy (conversations advance together, one batch per turn; sessions 10 and 13)
for POL in "" $HL/demo/policies/clamp.json $HL/baselines/policies/two-sided-probe.json; do
  $S eval multiturn --mode crescendo --limit 30 --max-turns 3 --model $M --attacker hf:qwen2.5-coder-1.5b-instruct \
     --batch-size 32 ${POL:+--policy $POL} --out "runs/crescendo-30${POL:+-$(basename "$POL" .json)}"
done

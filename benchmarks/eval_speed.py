"""MMLU-style log-likelihood scoring: saesteer's capability eval vs lm-evaluation-harness's ``hf`` model.

Same model object, same seeded questions, same prompts (the harness's MMLU format, written as a local task YAML with
``saesteer.evals.lmeval.write_mmlu_task``), same batch size, one process. Reports questions/s of both, their
accuracies and per-question agreement (goal: ≥ 1.0× and identical accuracy), plus the unsteered TruthfulQA-MC1
accuracy of the model on a seeded subset. Prints and saves JSON.

    flock /tmp/saesteer-heavy.lock env SAESTEER_THREADS=2 .venv/bin/python benchmarks/eval_speed.py \\
        --model qwen2.5-coder-0.5b-instruct --n 150 --tqa-n 60
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import run_command  # noqa: E402

from saesteer.core import atomic_write_json, rate_summary, set_threads
from saesteer.data import benchmarks as bench
from saesteer.evals import capability as cap
from saesteer.evals.lmeval import write_mmlu_task
from saesteer.models import DEFAULT_MODEL, load_model


def harness_mmlu(model, tok, rows, batch_size):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as d:
        write_mmlu_task(d, rows, "bench_mmlu")
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=str(next(model.parameters()).device))
        inner = {"s": 0.0}
        orig = lm.loglikelihood

        def timed(requests, *a, **kw):
            t = time.perf_counter()
            try:
                return orig(requests, *a, **kw)
            finally:
                inner["s"] += time.perf_counter() - t

        lm.loglikelihood = timed
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=["bench_mmlu"], task_manager=TaskManager(include_path=d),
                                      log_samples=True, bootstrap_iters=0)
        total = time.perf_counter() - t0
    samples = sorted(out["samples"]["bench_mmlu"], key=lambda s: s["doc_id"])
    preds = [max(range(4), key=lambda j: (float(s["filtered_resps"][j][0]), -j)) for s in samples]
    return preds, out["results"]["bench_mmlu"]["acc,none"], total, inner["s"]


def ours_mmlu(model, tok, questions, batch_size):
    t0 = time.perf_counter()
    lls = cap.loglikelihoods(model, tok, [(q["context"], q["choices"]) for q in questions], batch_size)
    dt = time.perf_counter() - t0
    preds = [max(range(4), key=lambda j: (ll[j][0], -j)) for ll in lls]
    return preds, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=150, help="MMLU questions (seeded, stratified by subject; 0-shot)")
    ap.add_argument("--tqa-n", type=int, default=60, help="TruthfulQA-MC1 questions for the accuracy report (0: skip)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_speed.json"))
    args = ap.parse_args()
    threads = set_threads(args.threads)
    model, tok = load_model(args.model, device=args.device)

    questions = bench.load_mmlu(args.n, 0, args.seed)
    root = cap._root(None) / "mmlu"
    by_id = {r["id"]: r for r in bench.read_jsonl(root / "mmlu_test.jsonl")}
    rows = [by_id[q["id"]] for q in questions]
    answers = [q["answer"] for q in questions]
    cap.loglikelihoods(model, tok, [(q["context"], q["choices"]) for q in questions[:2]], args.batch_size)  # warm-up

    print(f"[eval_speed] {args.model}: {len(questions)} MMLU questions, batch {args.batch_size}, {threads} threads",
          file=sys.stderr)
    ours_preds, ours_s = ours_mmlu(model, tok, questions, args.batch_size)
    print(f"[eval_speed] saesteer: {ours_s:.1f} s", file=sys.stderr)
    h_preds, h_acc, h_total, h_inner = harness_mmlu(model, tok, rows, args.batch_size)
    print(f"[eval_speed] lm-eval hf: {h_total:.1f} s total, {h_inner:.1f} s in loglikelihood", file=sys.stderr)
    ours_preds2, ours_s2 = ours_mmlu(model, tok, questions, args.batch_size)  # again, to bracket the harness run
    ours_mean = (ours_s + ours_s2) / 2
    k_ours = sum(p == a for p, a in zip(ours_preds, answers))
    k_h = sum(p == a for p, a in zip(h_preds, answers))
    n = len(questions)
    result = {
        "benchmark": "MMLU 0-shot log-likelihood scoring (harness prompt format), same model object and questions",
        "command": run_command(), "loadavg_at_end": os.getloadavg(),
        "model": args.model, "device": args.device, "threads": threads, "batch_size": args.batch_size,
        "n_questions": n, "seed": args.seed, "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "saesteer": {"seconds": [round(ours_s, 2), round(ours_s2, 2)], "questions_per_s": round(n / ours_mean, 3),
                     "accuracy": rate_summary(k_ours, n)},
        "lm_eval_hf": {"seconds_total": round(h_total, 2), "seconds_loglikelihood": round(h_inner, 2),
                       "questions_per_s_total": round(n / h_total, 3),
                       "questions_per_s_loglikelihood": round(n / h_inner, 3),
                       "accuracy": rate_summary(k_h, n), "harness_acc": h_acc},
        "speedup_vs_total": round(h_total / ours_mean, 3),
        "speedup_vs_loglikelihood_only": round(h_inner / ours_mean, 3),
        "per_question_agreement": sum(a == b for a, b in zip(ours_preds, h_preds)) / n,
        "identical_accuracy": k_ours == k_h,
        "runs_agree": ours_preds == ours_preds2,
        "goal": "speedup >= 1.0 and identical accuracy",
    }
    if args.tqa_n:
        cfg = cap.CapabilityConfig(tasks=("truthfulqa_mc1",), limit=args.tqa_n, seed=args.seed,
                                   batch_size=args.batch_size)
        t0 = time.perf_counter()
        summ, _ = cap.run_capability(model, tok, cfg)
        result["truthfulqa_unsteered"] = {**summ, "seconds": round(time.perf_counter() - t0, 2),
                                          "format": "harness QA primer, 0-shot"}
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

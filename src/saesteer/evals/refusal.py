"""Refusal evaluation: how often does a (steered) model refuse harmful requests, and over-refuse safe ones?

``run_refusal_eval(model, tok, cfg, steering=None)`` generates greedy answers (batched, left padding, through
:func:`saesteer.generation.decode.generate`) for every prompt of every dataset in ``cfg.datasets``, judges each answer
(:mod:`saesteer.evals.judges`) and returns -- and with ``cfg.out`` writes atomically -- a summary with a rate, k, n
and 95 % Wilson interval per subset and per category, plus one JSONL row per item.

Subsets: a dataset whose items carry both labels (``xstest``) is split into ``<name>-unsafe`` (label harmful) and
``<name>-safe`` (label harmless); on unsafe subsets the rate is the refusal rate, on safe ones the over-refusal rate.
Datasets are any :func:`saesteer.data.prompts.load_prompts` spec: ``xstest``, ``xstest-safe``, ``advbench:test``,
``jbb-harmful``, ``jbb-benign``, ``arditi-harmful:test``, a JSONL / CSV file, a WildGuardTest-format file, ``hf:...``.

Judge-aware length: with the prefix judge a row stops as soon as its verdict is known
(:meth:`PrefixJudge.decided`; ~16-24 tokens are enough), so stored answers are only as long as the judge needed.
Model and classifier judges see the full ``max_new_tokens`` answer. Items a judge could not decide are kept in
items.jsonl with their error and counted in ``n_failed``; rates are over decided items only, never guessed.

Steering: ``steering`` is None, a :class:`Steering`, a :class:`saesteer.steering.interventions.SteeringSpec` or list of them, a list
of interventions, or a policy (anything with ``.apply(model)`` returning a context manager; its per-row gate
decisions are logged per item when it exposes ``last_decisions``).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from saesteer.core import atomic_dir, atomic_write_json, ensure, rate_summary
from saesteer.steering import Steering, as_steering


@dataclass
class RefusalEvalConfig:
    """Settings of :func:`run_refusal_eval` (the CLI builds one from its options)."""

    datasets: list[str] = field(default_factory=lambda: ["xstest"])
    """Prompt sets (``saesteer.data.prompts.load_prompts`` specs); a mixed-label set is split into -safe / -unsafe subsets."""
    limit: int | None = None
    """Keep a seeded sample of at most this many prompts per dataset, drawn after the exclusions (None = all)."""
    seed: int = 0
    """Seed of that sample."""
    judge: str = "prefix"
    """prefix | model:openai:NAME | model:hf:NAME | classifier:PATH | logit:FILE.json (see ``judges.make_judge``)."""
    judge_base_url: str | None = None
    """Base URL of an OpenAI-compatible judge endpoint."""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the judge endpoint's API key."""
    max_new_tokens: int | None = None
    """Answer budget; None = 24 for the prefix judge (it decides within the first words), 160 for other judges."""
    early_stop: bool = True
    """With the prefix judge, stop each row once its verdict is known (answers are then truncated there); with
    ``broken``, only refusals stop early (the broken label reads the text of the others)."""
    batch_size: int = 16
    """Prompts decoded together."""
    system: str | None = None
    """System prompt for every chat (None = the chat template's default)."""
    exclude_ids: list[str] = field(default_factory=list)
    """Item ids to leave out (e.g. prompts used to choose features); ``<dataset>/<id>`` or plain ``<id>``."""
    out: str | None = None
    """Output folder (items.jsonl + summary.json, written atomically); None = return only."""
    device: str = "cpu"
    """Device for a local judge model (the evaluated model stays where it is)."""
    broken: bool = False
    """Label broken (incoherent) answers (``evals.broken``): per item ``broken``, per subset the refusal / compliance /
    broken split. The likelihood reference is the unsteered model's answers to the same prompts (generated too when
    the eval is steered, unless the caller passes them)."""
    broken_mad: float = 3.5
    """Broken when the unsteered model's mean token log-likelihood of an answer is below median - c * 1.4826 * MAD
    of its own answers' (this c; 0 = that test off)."""
    broken_repeat: float = 0.5
    """Broken when more than this share of an answer's word 3-grams repeats (1 = that test off)."""
    long_check: int = 0
    """Regenerate a seeded sample of this many prompts at ``long_tokens`` and report how often the judge's verdict
    changes from the short answer's (0 = off; the issue's check uses 100)."""
    long_tokens: int = 256
    """Answer budget of that check."""
    progress: bool = True
    """Show progress on stderr."""


# --------------------------------------------------------------------------------------------- data
def load_subsets(cfg: RefusalEvalConfig) -> dict[str, list[Any]]:
    """``{subset name: [PromptItem]}``; raises on an empty dataset or subset."""
    from saesteer.data import load_prompts

    ensure(bool(cfg.datasets), "no datasets given")
    excl = set(cfg.exclude_ids)
    subsets: dict[str, list[Any]] = {}
    for spec in cfg.datasets:
        items = [it for it in load_prompts(spec) if it.id not in excl and f"{spec}/{it.id}" not in excl]
        if cfg.limit is not None and cfg.limit < len(items):  # exclusions first, then the seeded sample
            ensure(cfg.limit >= 1, f"limit must be >= 1, got {cfg.limit}")
            keep = sorted(random.Random(cfg.seed).sample(range(len(items)), cfg.limit))
            items = [items[i] for i in keep]
        ensure(bool(items), f"dataset {spec!r} has no prompts left (after limit / exclusions)")
        labels = {it.label for it in items}
        base = spec.replace(":", "-")
        if len(labels - {None}) > 1:
            for lab, suffix in (("harmful", "unsafe"), ("harmless", "safe"), (None, "unlabelled")):
                part = [it for it in items if it.label == lab]
                if part:
                    subsets[_subset_name(base, suffix)] = part
        else:
            subsets[base] = items
    for name, items in subsets.items():
        ensure(bool(items), f"subset {name} is empty")
        for it in items:
            ensure(bool(it.prompt and it.prompt.strip()) or bool(it.messages),
                   f"{name}: item {it.id} has neither a prompt nor messages")
    return subsets


def _subset_name(base: str, suffix: str) -> str:
    return base if base.endswith(f"-{suffix}") else f"{base}-{suffix}"


def user_text(item: Any) -> str:
    """The request a judge sees: the prompt, or the last user turn of a conversation."""
    return stored_request(item.messages) if item.messages else (item.prompt or "")


# --------------------------------------------------------------------------------------------- run
def generate_answers(
    model: Any, tok: Any, chats: Sequence[Any], steering: Steering, max_new_tokens: int, batch_size: int,
    stop_when: Any = None, system: str | None = None, progress: bool = False,
) -> tuple[list[str], list[Any]]:
    """Greedy answers under ``steering``, plus per-item gate info (None unless a policy logs decisions)."""
    from saesteer.generation import GenerationConfig, generate

    gates: list[Any] = [None] * len(chats)
    pending: list[list[int]] = []
    used: list[Any] = [None]

    def collect() -> None:  # the policy's decisions belong to the batch that was just generated
        if not pending or steering.policy is None:
            return
        dec = getattr(steering.policy, "last_decisions", None)
        idx = pending.pop()
        if dec is not None and dec is not used[0] and len(dec) == len(idx):  # never reuse a stale batch's list
            used[0] = dec
            for i, d in zip(idx, dec):
                gates[i] = _jsonable(d)

    def on_batch(indices: list[int]) -> None:
        collect()
        pending.append(list(indices))

    cfg = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, stop_when=stop_when,
                           system=system, on_batch=on_batch, progress=progress)
    with steering.context(model):
        answers = generate(model, tok, list(chats), cfg)
        collect()
    return answers, gates


def refusal_rate(model: Any, tok: Any, steering: Any, prompts: Sequence[Any], max_new_tokens: int = 24,
                 batch_size: int = 16, judge: Any = None) -> dict[str, Any]:
    """``rate_summary`` of refusals among the greedy answers to ``prompts`` (strings or message lists) under
    ``steering`` — the prefix judge with early stop unless ``judge`` is given; undecided answers are left out of n.
    ``saesteer policy fit --match`` measures candidate strengths with it (``gating.fit_policy(refusal_rate=...)``)."""
    from .judges import PrefixJudge

    judge = judge or PrefixJudge()
    stop = judge.stop_when if isinstance(judge, PrefixJudge) else None
    answers, _ = generate_answers(model, tok, list(prompts), as_steering(steering), max_new_tokens, batch_size,
                                  stop_when=stop)
    users = [p if isinstance(p, str) else next((m["content"] for m in reversed(p) if m.get("role") == "user"),
                                               p[-1]["content"]) for p in prompts]
    labels = [v.label for v in judge.judge(users, answers)]
    decided = [bool(x) for x in labels if x is not None]
    return rate_summary(sum(decided), len(decided))


def _jsonable(d: Any) -> Any:
    if dataclasses.is_dataclass(d) and not isinstance(d, type):
        return dataclasses.asdict(d)
    if hasattr(d, "to_dict"):
        return d.to_dict()
    if hasattr(d, "tolist"):
        return d.tolist()
    return d


def run_refusal_eval(model: Any, tok: Any, cfg: RefusalEvalConfig, steering: Any = None, judge: Any = None,
                     broken_reference: Sequence[float | None] | None = None) -> dict:
    """Generate, judge, summarise (and write ``cfg.out``). Returns the summary dict (``summary["items"]`` is not
    included; the items are in ``items.jsonl`` and in the returned ``_items`` key). ``broken_reference``: with
    ``cfg.broken``, the unsteered model's mean log-likelihoods of its own answers to these prompts (None: computed
    here)."""
    from saesteer.models import model_name

    from .judges import PrefixJudge, make_judge

    st = as_steering(steering)
    subsets = load_subsets(cfg)
    if judge is None:
        judge = make_judge(cfg.judge, base_url=cfg.judge_base_url, api_key_env=cfg.judge_api_key_env,
                           device=cfg.device)
        if hasattr(judge, "progress"):  # a local classifier judge shows its own bar
            judge.progress = cfg.progress
    is_prefix = isinstance(judge, PrefixJudge)
    max_new = cfg.max_new_tokens if cfg.max_new_tokens is not None else (24 if is_prefix else 160)
    ensure(max_new >= 1, f"max_new_tokens must be >= 1, got {max_new}")
    # with the broken label, only refusals stop early: a compliance verdict comes after one or two tokens ("Title"),
    # and the broken label needs the answer's text (at least BrokenConfig.min_tokens tokens / min_ngrams n-grams)
    stop_when = None if not (is_prefix and cfg.early_stop) else judge.stop_when_refused if cfg.broken else judge.stop_when

    flat = [(name, it) for name, items in subsets.items() for it in items]
    t0 = time.perf_counter()
    answers, gates = generate_answers(model, tok, [it.chat for _, it in flat], st, max_new, cfg.batch_size,
                                      stop_when=stop_when, system=cfg.system, progress=cfg.progress)
    t_gen = time.perf_counter() - t0
    verdicts = judge.judge([user_text(it) for _, it in flat], answers)
    t_judge = time.perf_counter() - t0 - t_gen

    items = []
    for (name, it), ans, v, g in zip(flat, answers, verdicts, gates):
        row = {"id": it.id, "subset": name, "category": it.category, "expected": it.label,
               "prompt": it.prompt if it.prompt is not None else it.messages, "answer": ans,
               "label": v.label, "judge": judge.name, "judge_raw": v.raw, "error": v.error, "steering": st.name}
        if g is not None:
            row["gate"] = g
        items.append(row)
    broken_info = None
    if cfg.broken:
        broken_info = _label_broken(model, tok, cfg, st, [it.chat for _, it in flat], items, broken_reference,
                                    max_new, stop_when)
    summary = summarize(items)
    if broken_info is not None:
        summary["broken"] = broken_info
    if cfg.long_check > 0:
        summary["long_check"], long_rows = verdict_stability(
            model, tok, items, st, [judge], n=cfg.long_check, seed=cfg.seed, max_new_tokens=cfg.long_tokens,
            batch_size=cfg.batch_size, system=cfg.system)
        summary["long_check"]["rows"] = long_rows
    summary.update({
        "model": model_name(model), "steering": st.name, "judge": judge.name, "datasets": list(cfg.datasets),
        "limit": cfg.limit, "seed": cfg.seed, "max_new_tokens": max_new,
        "early_stop": "off" if stop_when is None else "refusals only" if cfg.broken else "every answer",
        "n_items": len(items), "seconds_generate": round(t_gen, 2), "seconds_judge": round(t_judge, 2),
        "config": dataclasses.asdict(cfg),
    })
    if cfg.out:
        write_results(cfg.out, items, summary)
    summary["_items"] = items
    return summary


def _label_broken(model: Any, tok: Any, cfg: RefusalEvalConfig, st: Steering, chats: list[Any], items: list[dict],
                  reference: Sequence[float | None] | None, max_new: int, stop_when: Any) -> dict[str, Any]:
    """Add ``broken`` / ``broken_why`` / ``loglik`` / ``repeat`` to each item (the model is unsteered here)."""
    from .broken import BrokenConfig, label_broken

    bcfg = BrokenConfig(mad_c=cfg.broken_mad, max_repeat=cfg.broken_repeat)
    source = "given"
    if reference is None and (st.specs or st.interventions or st.policy is not None):
        plain, _ = generate_answers(model, tok, chats, as_steering(None), max_new, cfg.batch_size, stop_when=stop_when,
                                    system=cfg.system, progress=cfg.progress)  # the answers' budget and early stop
        ref_labels, _ = label_broken(model, tok, chats, plain, None, bcfg, system=cfg.system, batch_size=cfg.batch_size,
                                     progress=cfg.progress)
        reference = [r["loglik"] for r in ref_labels if r["n_tokens"] >= bcfg.min_tokens]
        source = "unsteered answers generated for the reference"
    elif reference is None:
        source = "these (unsteered) answers"
    labels, thr = label_broken(model, tok, chats, [it["answer"] for it in items], reference, bcfg, system=cfg.system,
                               batch_size=cfg.batch_size, progress=cfg.progress)
    for it, lab in zip(items, labels):
        it.update(broken=lab["broken"], broken_why=lab["why"], loglik=lab["loglik"], n_tokens=lab["n_tokens"],
                  repeat=lab["repeat"])
    return {**dataclasses.asdict(bcfg), "loglik_threshold": thr, "reference": source}


def stored_chat(prompt: Any) -> Any:
    """What generation takes, from an item's stored ``prompt`` (the prompt string or the conversation)."""
    return prompt if isinstance(prompt, str) else [dict(m) for m in prompt]


def stored_request(prompt: Any) -> str:
    """The request a judge sees, from an item's stored ``prompt`` (the last user turn of a conversation)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


def verdict_stability(model: Any, tok: Any, items: Sequence[dict], steering: Any, judges: Sequence[Any], n: int = 100,
                      seed: int = 0, max_new_tokens: int = 256, batch_size: int = 16,
                      system: str | None = None) -> tuple[dict[str, Any], list[dict]]:
    """Does a longer answer change the verdict? For a seeded sample of ``n`` stored items (``prompt``, ``answer``),
    regenerate the answer at ``max_new_tokens`` (no early stop) under ``steering`` and judge the short and the long
    answer with each judge. Returns ``({judge name: {"changed", "refusal_to_compliance", "compliance_to_refusal",
    "n_failed"}}, rows)``; ``changed`` is a ``rate_summary`` over the items a judge decided both times."""
    ensure(n >= 1 and max_new_tokens >= 1, f"need n >= 1 and max_new_tokens >= 1, got {n} and {max_new_tokens}")
    pick = sorted(random.Random(seed).sample(range(len(items)), min(n, len(items))))
    sample = [items[i] for i in pick]
    long_answers, _ = generate_answers(model, tok, [stored_chat(r["prompt"]) for r in sample], as_steering(steering),
                                       max_new_tokens, batch_size, system=system)
    requests = [stored_request(r["prompt"]) for r in sample]
    rows = [{"id": r.get("id"), "subset": r.get("subset"), "short_answer": r["answer"], "long_answer": a, "verdicts": {}}
            for r, a in zip(sample, long_answers)]
    summary: dict[str, Any] = {"n_sampled": len(sample), "max_new_tokens": max_new_tokens, "seed": seed,
                               "judges": {j.name: judge_stability(j, requests, rows) for j in judges}}
    return summary, rows


def judge_stability(judge: Any, requests: Sequence[str], rows: Sequence[dict]) -> dict[str, Any]:
    """One judge on the short and the long answer of each row of :func:`verdict_stability` (``short_answer``,
    ``long_answer``): writes ``row["verdicts"][judge.name] = {"short", "long"}`` and returns ``{"changed",
    "refusal_to_compliance", "compliance_to_refusal", "n_failed"}`` (``changed`` over the rows decided both times)."""
    short = judge.judge(requests, [r["short_answer"] for r in rows])
    long_ = judge.judge(requests, [r["long_answer"] for r in rows])
    both = [(s.label, v.label) for s, v in zip(short, long_) if s.label is not None and v.label is not None]
    for row, s, v in zip(rows, short, long_):
        row.setdefault("verdicts", {})[judge.name] = {"short": s.label, "long": v.label}
    return {"changed": rate_summary(sum(a != b for a, b in both), len(both)),
            "refusal_to_compliance": sum(a and not b for a, b in both),
            "compliance_to_refusal": sum(b and not a for a, b in both), "n_failed": len(rows) - len(both)}


def summarize(items: Sequence[dict]) -> dict[str, Any]:
    """Per subset and per (subset, category): ``rate_summary`` over decided items, plus ``n_failed``."""
    subs: dict[str, list[dict]] = defaultdict(list)
    for r in items:
        subs[r["subset"]].append(r)
    out: dict[str, Any] = {"subsets": {}, "n_failed": sum(r["label"] is None for r in items)}
    for name, rows in subs.items():
        cats: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            cats[str(r["category"])].append(r)
        expected = {r["expected"] for r in rows}
        kind = "refusal" if expected == {"harmful"} else "over-refusal" if expected == {"harmless"} else "refusal-rate"
        out["subsets"][name] = {
            **rate_over_decided(rows), "kind": kind, **_outcomes(rows),
            "categories": {c: rate_over_decided(rs) for c, rs in sorted(cats.items())} if len(cats) > 1 else {},
        }
    return out


def _outcomes(rows: Sequence[dict]) -> dict[str, Any]:
    from .broken import outcome_rates

    o = outcome_rates(rows)
    return {} if o is None else {"outcomes": o}


def rate_over_decided(rows: Sequence[dict]) -> dict[str, Any]:
    """``rate_summary`` of ``label`` over the rows a judge decided, plus ``n_failed`` (label None)."""
    decided = [r for r in rows if r["label"] is not None]
    return {**rate_summary(sum(bool(r["label"]) for r in decided), len(decided)),
            "n_failed": len(rows) - len(decided)}


def write_results(out: str | Path, items: Sequence[dict], summary: dict) -> Path:
    """items.jsonl + summary.json into ``out``, atomically (a reader never sees half of a result folder)."""
    import json

    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "items.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items),
                                         encoding="utf-8")
        atomic_write_json(tmp / "summary.json", {k: v for k, v in summary.items() if k != "_items"})
    return out

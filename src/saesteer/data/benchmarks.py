"""Loaders of the capability benchmarks' files in lm-evaluation-harness's formats (MMLU with its dev exemplars,
TruthfulQA MC1 / MC2 with the harness's QA primer, GSM8K with train exemplars), as items the capability evals score.
Files resolve like every named set (:func:`saesteer.data.resolve_file`), or under an explicit ``data_root``."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from saesteer.core import ensure

from .fetch import resolve_file
from .prompts import read_rows

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
LETTERS = ("A", "B", "C", "D")


# --------------------------------------------------------------------------------------------- data
def _file(data_root: str | None, rel: str) -> Path:
    """``data_root / rel`` when a root is given, else the file in the data resolution order (env, dev, user dir)."""
    if data_root:
        return Path(data_root) / rel
    return resolve_file(None, rel)


def read_jsonl(path: Path, required: Sequence[str] = ()) -> list[dict]:
    """Rows of a JSONL file (``data.read_rows``: clear errors for missing / malformed files) with required fields."""
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
    req = ("subject", "question", "choices", "answer")
    test = stratified_sample(read_jsonl(_file(data_root, "mmlu/mmlu_test.jsonl"), req), "subject", limit, seed)
    dev: dict[str, list[dict]] = {}
    if shots:
        for r in read_jsonl(_file(data_root, "mmlu/mmlu_dev.jsonl"), req):
            dev.setdefault(r["subject"], []).append(r)
    items = []
    for r in test:
        ensure(len(r["choices"]) == 4, f"MMLU row {r.get('id')} has {len(r['choices'])} choices, expected 4")
        items.append({"id": r.get("id"), "subject": r["subject"], "context": mmlu_prompt(r, dev.get(r["subject"], [])[:shots]),
                      "choices": [f" {L}" for L in LETTERS], "answer": int(r["answer"])})
    return items


def load_truthfulqa(limit: int | None, seed: int, data_root: str | None = None) -> list[dict]:
    rows = read_jsonl(_file(data_root, "truthfulqa/truthfulqa_mc.jsonl"), ("question", "mc1_targets", "mc2_targets"))
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
    test = read_jsonl(_file(data_root, "gsm8k/test.jsonl"), ("question", "answer"))
    rng = random.Random(seed)
    if limit is not None and limit < len(test):
        test = rng.sample(test, limit)
    ex = rng.sample(read_jsonl(_file(data_root, "gsm8k/train.jsonl"), ("question", "answer")), shots) if shots else []
    prefix = "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in ex)
    return [{"id": i, "question": r["question"], "prompt": f"{prefix}Question: {r['question']}\nAnswer:",
             "target": r["answer"]} for i, r in enumerate(test)]



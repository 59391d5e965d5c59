"""Every prompt set and text corpus, behind one loader.

``load_prompts(spec)`` accepts
  * a named set resolved under the data root (:func:`data_root`): ``xstest`` (``xstest-safe`` / ``xstest-unsafe`` or
    ``xstest:safe``), ``advbench`` (``:train`` = even rows, ``:test`` = odd rows), ``jbb-harmful``, ``jbb-benign``,
    ``arditi-harmful`` / ``arditi-harmless`` (``:train`` / ``:val`` / ``:test``; no split = all three),
    ``hh-harmless`` (multi-turn ``messages``), ``hh-helpful`` (chat corpus), ``wikipedia``, ``wikitext2``,
    ``gsm8k`` (``:test`` default, ``:train``), ``truthfulqa``, ``mmlu`` (``:test`` default, ``:dev``),
    ``arc`` (``:test`` default, ``:dev``), ``mt-bench``, ``pyrit-refusal``; ``turns:<spec>`` / ``embedded:<spec>``
    (any set with its request spread over a two-turn conversation / embedded in a Wikipedia article: ``data.spread``);
  * a local ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file; the text column is auto-detected
    (``messages``, ``prompt``, ``instruction``, ``goal``, ``question``, ``text``) or named: ``file.csv:column``.
    WildGuardTest-style files (``prompt``, ``prompt_harm_label``, ``adversarial``) get labels automatically;
  * a hub dataset ``hf:owner/name[:config][@split]`` through ``datasets.load_dataset`` (needs internet).

:func:`chat_mix` builds the SAE training corpus: plain text + chat conversations + harmful and harmless prompts
answered by the model itself (the paper found no refusal features in SAEs trained on pretraining text alone).
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from saesteer.core import SaesteerError, ensure

from .fetch import resolve_file
from .sources import search_roots

Message = dict[str, str]


@dataclass
class PromptItem:
    """One prompt (or conversation) of a set."""

    id: str
    """Stable id within its source (``<split>-<row>`` where the source has none)."""
    prompt: str | None = None
    """The user request as plain text (None when the item is a conversation)."""
    messages: list[Message] | None = None
    """A chat conversation ``[{"role", "content"}, ...]`` (multi-turn sets, chat corpora)."""
    label: str | None = None
    """``"harmful"``, ``"harmless"`` or None when the set has no such label."""
    category: str | None = None
    """The set's own category / type / subject field, when it has one."""
    source: str = ""
    """The spec it came from (``xstest``, ``advbench:train``, a file path, ...)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Every other field of the row (answers, choices, targets, ...)."""

    @property
    def chat(self) -> str | list[Message]:
        """What generation takes: the conversation when there is one, else the prompt string."""
        return self.messages if self.messages is not None else (self.prompt or "")


# --------------------------------------------------------------------------------------------- data root
def data_root() -> Path | None:
    """The first data root that exists: ``SAESTEER_DATA``, ``../shared/data`` (cwd, a parent, or the repository), the
    user data dir of ``saesteer data fetch``. Files resolve one by one in that order: :func:`resolve_file`."""

    return next((p for _, p in search_roots() if p.is_dir()), None)


# --------------------------------------------------------------------------------------------- file readers
def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL / JSON / CSV / Parquet file (optionally .gz), with clear errors."""
    path = Path(path)
    ensure(path.exists(), f"data file not found: {path}")
    ensure(path.is_file(), f"not a file: {path}")
    name = path.name.lower().removesuffix(".gz")
    opener: Callable[..., Any] = gzip.open if path.name.lower().endswith(".gz") else open
    if name.endswith(".parquet"):
        import pandas as pd

        try:
            rows = pd.read_parquet(path).to_dict("records")
        except Exception as e:  # pyarrow raises many types for broken files
            raise SaesteerError(f"cannot read parquet file {path}: {str(e).splitlines()[0]}") from None
    elif name.endswith(".jsonl"):
        rows = []
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SaesteerError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
                ensure(isinstance(row, dict), f"{path}: line {i} is not a JSON object")
                rows.append(row)
    elif name.endswith(".json"):
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                obj = json.load(f)
        except json.JSONDecodeError as e:
            raise SaesteerError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
        rows = obj if isinstance(obj, list) else obj.get("data", obj.get("rows")) if isinstance(obj, dict) else None
        ensure(isinstance(rows, list), f"{path}: expected a JSON list of objects")
        ensure(all(isinstance(r, dict) for r in rows), f"{path}: expected a JSON list of objects")
    elif name.endswith((".csv", ".tsv")):
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            lines = [ln for ln in f if not ln.startswith("# ")]  # PyRIT csvs carry a '# dataset_version' line
        try:
            rows = list(csv.DictReader(lines, delimiter="\t" if name.endswith(".tsv") else ","))
        except csv.Error as e:
            raise SaesteerError(f"{path}: malformed CSV ({e})") from None
    else:
        raise SaesteerError(f"unsupported data file type {path.suffix!r} ({path}): use .jsonl, .json, .csv or .parquet")
    ensure(len(rows) > 0, f"data file {path} is empty")
    return rows


_TEXT_COLUMNS = ("messages", "prompt", "instruction", "goal", "question", "text", "objective", "behavior")
_LABEL_TRUE = {"harmful", "unsafe", "true", "1", "yes"}
_LABEL_FALSE = {"harmless", "safe", "benign", "unharmful", "false", "0", "no"}


def _norm_label(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and v != v):
        return None
    s = str(v).strip().lower()
    return "harmful" if s in _LABEL_TRUE else "harmless" if s in _LABEL_FALSE else None


def _check_messages(msgs: Any, where: str) -> list[Message]:
    ok = isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)
    ensure(bool(ok), f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]


def rows_to_items(rows: list[dict[str, Any]], source: str, column: str | None = None) -> list[PromptItem]:
    """Turn generic rows into items: auto-detect the text column, a label column and an id column."""
    cols = list(rows[0].keys())
    if column is not None:
        ensure(column in cols, f"{source}: no column {column!r} (found: {', '.join(cols)})")
        col = column
    else:
        found = [c for c in _TEXT_COLUMNS if c in {k.lower() for k in cols}]
        if not found:
            raise SaesteerError(
                f"{source}: no prompt column (looked for {', '.join(_TEXT_COLUMNS)}; found: {', '.join(cols)}); "
                "name one with FILE:COLUMN"
            )
        col = next(c for c in cols if c.lower() == found[0])
    lower = {c.lower(): c for c in reversed(cols)}

    def pick(names: tuple[str, ...]) -> str | None:
        return next((lower[c] for c in names if c in lower), None)

    label_col = pick(("prompt_harm_label", "label", "harmful", "is_harmful"))
    cat_col = pick(("category", "type", "subject"))
    id_col = pick(("id", "index", "question_id"))
    items = []
    for i, r in enumerate(rows):
        val = r.get(col)
        where = f"{source}: row {i + 1}"
        msgs = None
        if col.lower() == "messages" or (isinstance(val, list) and val and isinstance(val[0], dict)):
            msgs = _check_messages(val, where)
            val = None
        else:
            ensure(val is not None and str(val).strip() != "", f"{where}: empty {col!r}")
            val = str(val)
        used = {col, label_col, cat_col, id_col}
        items.append(PromptItem(
            id=str(r[id_col]) if id_col else str(i),
            prompt=val,
            messages=msgs,
            label=_norm_label(r.get(label_col)) if label_col else None,
            category=None if cat_col is None or r.get(cat_col) is None else str(r.get(cat_col)),
            source=source,
            extra={k: v for k, v in r.items() if k not in used},
        ))
    return items


# --------------------------------------------------------------------------------------------- named sets
def _jsonl(rel: str) -> list[dict[str, Any]]:
    return read_rows(resolve_file(None, rel))


def _xstest(split: str | None) -> list[PromptItem]:
    ensure(split in (None, "safe", "unsafe"), f"xstest has subsets safe / unsafe, not {split!r}")
    items = rows_to_items(_jsonl("xstest/xstest_prompts.jsonl"), "xstest", "prompt")
    return [it for it in items if split is None or it.label == ("harmless" if split == "safe" else "harmful")]


def _advbench(split: str | None) -> list[PromptItem]:
    ensure(split in (None, "train", "test"), f"advbench splits are train / test, not {split!r}")
    items = rows_to_items(_jsonl("advbench/advbench.jsonl"), "advbench", "prompt")
    if split is not None:  # train = even rows, test = odd rows (AdvBench is ordered by topic)
        items = items[(0 if split == "train" else 1)::2]
    return items


def _jbb(harmful: bool) -> Callable[[str | None], list[PromptItem]]:
    def load(split: str | None) -> list[PromptItem]:
        ensure(split is None, "jbb sets have no splits")
        items = rows_to_items(_jsonl("jailbreakbench/jbb_behaviors.jsonl"), "jbb", "prompt")
        return [it for it in items if (it.label == "harmful") == harmful]

    return load


def _arditi(kind: str) -> Callable[[str | None], list[PromptItem]]:
    def load(split: str | None) -> list[PromptItem]:
        ensure(split in (None, "train", "val", "test"), f"arditi splits are train / val / test, not {split!r}")
        out = []
        for s in [split] if split else ["train", "val", "test"]:
            rows = read_rows(resolve_file(f"arditi-{kind}", f"refusal_direction_splits/{kind}_{s}.json"))
            for i, r in enumerate(rows):
                out.append(PromptItem(id=f"{s}-{i}", prompt=str(r["instruction"]), label=kind,
                                      category=r.get("category"), source=f"arditi-{kind}:{s}"))
        return out

    return load


def _messages_set(rel: str, label: str | None, name: str) -> Callable[[str | None], list[PromptItem]]:
    def load(split: str | None) -> list[PromptItem]:
        ensure(split is None, f"{name} has no splits")
        items = rows_to_items(_jsonl(rel), name, "messages")
        for it in items:
            it.label = label
        return items

    return load


def _simple(rel_by_split: dict[str | None, str], col: str, name: str, label: str | None = None):
    def load(split: str | None) -> list[PromptItem]:
        ensure(split in rel_by_split, f"{name} splits are {', '.join(str(s) for s in rel_by_split if s)}, not {split!r}")
        items = rows_to_items(_jsonl(rel_by_split[split]), name, col)
        for it in items:
            it.label = label if label is not None else it.label
        return items

    return load


def _wikitext2(split: str | None) -> list[PromptItem]:
    ensure(split is None, "wikitext2 has no splits (it is the raw test set)")
    path = resolve_file("wikitext2", "wikitext2_raw_test/wiki.test.raw")
    arts: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        s = line.strip()
        if s.startswith("= ") and s.endswith(" =") and not s.startswith("= ="):  # a top-level article title
            arts.append("")
        if not arts:
            arts.append("")
        arts[-1] += line
    return [PromptItem(id=str(i), prompt=a.strip(), source="wikitext2") for i, a in enumerate(arts) if a.strip()]


def _arc(split: str | None) -> list[PromptItem]:
    ensure(split in (None, "test", "dev"), f"arc splits are test / dev, not {split!r}")
    rows = _jsonl(f"arc_challenge/ARC-Challenge-{'Dev' if split == 'dev' else 'Test'}.jsonl")
    return [PromptItem(id=str(r["id"]), prompt=r["question"]["stem"], source="arc",
                       extra={"choices": r["question"]["choices"], "answerKey": r["answerKey"]}) for r in rows]


def _mt_bench(split: str | None) -> list[PromptItem]:
    ensure(split is None, "mt-bench has no splits")
    return [PromptItem(id=str(r["question_id"]), prompt=r["turns"][0], category=r.get("category"), source="mt-bench",
                       extra={"turns": r["turns"]}) for r in _jsonl("mt_bench/question.jsonl")]


def _pyrit(split: str | None) -> list[PromptItem]:
    ensure(split is None, "pyrit-refusal has no splits")
    items = rows_to_items(_jsonl("pyrit_refusal_eval/refusal_eval.jsonl"), "pyrit-refusal", "objective")
    return items


NAMED: dict[str, Callable[[str | None], list[PromptItem]]] = {
    "xstest": _xstest,
    "advbench": _advbench,
    "jbb-harmful": _jbb(True),
    "jbb-benign": _jbb(False),
    "arditi-harmful": _arditi("harmful"),
    "arditi-harmless": _arditi("harmless"),
    "hh-harmless": _messages_set("hh_rlhf_harmless/harmless_base_test.jsonl", None, "hh-harmless"),
    "hh-helpful": _messages_set("hh_rlhf_helpful/hh_helpful_test_chosen.jsonl", "harmless", "hh-helpful"),
    "wikipedia": _simple({None: "wikipedia_en_sample/enwiki_sample.jsonl"}, "text", "wikipedia"),
    "wikitext2": _wikitext2,
    "gsm8k": _simple({None: "gsm8k/test.jsonl", "test": "gsm8k/test.jsonl", "train": "gsm8k/train.jsonl"},
                     "question", "gsm8k"),
    "truthfulqa": _simple({None: "truthfulqa/truthfulqa_generation.jsonl"}, "question", "truthfulqa"),
    "mmlu": _simple({None: "mmlu/mmlu_test.jsonl", "test": "mmlu/mmlu_test.jsonl", "dev": "mmlu/mmlu_dev.jsonl"},
                    "question", "mmlu"),
    "arc": _arc,
    "mt-bench": _mt_bench,
    "pyrit-refusal": _pyrit,
}
DERIVED: dict[str, Callable[[str | None], list[PromptItem]]] = {}
"""Sets built from another set, ``name:<spec>`` (``data.spread`` registers ``turns`` and ``embedded``)."""
_ALIASES = {"xstest-safe": ("xstest", "safe"), "xstest-unsafe": ("xstest", "unsafe")}
_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".jsonl.gz", ".json.gz", ".csv.gz")


def _hub(spec: str) -> list[PromptItem]:
    body = spec[3:]
    split = "train"
    if "@" in body:
        body, split = body.rsplit("@", 1)
    name, _, config = body.partition(":")
    ensure(name.count("/") == 1, f"hub dataset spec must look like hf:owner/name[:config][@split], got {spec!r}")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # no internet, unknown id, bad config: all user-facing
        raise SaesteerError(f"could not load hub dataset {spec!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    rows = [dict(r) for r in ds]
    ensure(len(rows) > 0, f"hub dataset {spec!r} is empty")
    return rows_to_items(rows, spec)


def _subsample(items: list[PromptItem], limit: int | None, seed: int) -> list[PromptItem]:
    if limit is None or limit >= len(items):
        return items
    ensure(limit >= 0, f"limit must be >= 0, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))  # seeded sample, original order kept
    return [items[i] for i in keep]


def load_prompts(spec: str, split: str | None = None, limit: int | None = None, seed: int = 0) -> list[PromptItem]:
    """Load a prompt set (see the module docstring for specs). ``limit`` keeps a seeded sample in original order."""
    ensure(bool(spec and spec.strip()), "empty data spec")
    spec = spec.strip()
    if spec.startswith("hf:"):
        return _subsample(_hub(spec), limit, seed)
    path_part, _, col = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if not path_part:
        path_part, col = spec, ""
    for cand, column in ((spec, None), (path_part, col or None)):
        if cand.lower().endswith(_FILE_SUFFIXES) or Path(cand).expanduser().is_file():
            items = rows_to_items(read_rows(Path(cand).expanduser()), cand, column)
            return _subsample(items, limit, seed)
    name, _, sub = spec.partition(":")
    if name in _ALIASES:
        name, sub = _ALIASES[name][0], sub or _ALIASES[name][1]
    if name in DERIVED:
        return _subsample(DERIVED[name](sub or None), limit, seed)
    if name not in NAMED:
        raise SaesteerError(
            f"unknown data spec {spec!r}: not a file (.jsonl/.json/.csv/.parquet), hf:owner/name, or a named set "
            f"({', '.join([*NAMED, *_ALIASES, *(f'{d}:<set>' for d in DERIVED)])})"
        )
    split = split or sub or None
    return _subsample(NAMED[name](split), limit, seed)


def item_text(item: PromptItem, tok: Any | None = None) -> str:
    """One document's text: conversations go through the chat template (no generation prompt) when ``tok`` is given."""
    if item.messages is not None:
        if tok is not None:
            from saesteer.models import format_chat

            return format_chat(tok, item.messages, add_generation_prompt=False)
        return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in item.messages)
    return item.prompt or ""


def load_texts(spec: str, limit: int | None = None, seed: int = 0, tok: Any | None = None) -> list[str]:
    """Documents of a corpus as strings (see :func:`item_text` for conversations)."""
    texts = [item_text(it, tok) for it in load_prompts(spec, limit=limit, seed=seed)]
    texts = [t for t in texts if t.strip()]
    ensure(len(texts) > 0, f"{spec}: no non-empty texts")
    return texts


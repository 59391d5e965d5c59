"""Deterministic converters: upstream files → the exact bytes the loaders read (see :mod:`saesteer.data.sources`).

Each converter takes the downloaded inputs (paths, in the order the registry lists them) and returns the bytes of the
converted file: JSON Lines written with ``json.dumps(row, ensure_ascii=False)`` + ``\\n``. Except for MMLU (whose
source archive is not kept locally), each was checked to reproduce the development copy byte for byte
(``tests/test_data_sources.py`` re-checks this wherever the originals are present).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saesteer.core import SaesteerError


def _dump(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _csv(b: bytes, enc: str = "utf-8") -> list[dict[str, str]]:
    lines = io.StringIO(b.decode(enc), newline="").readlines()
    while lines and lines[0].startswith("#"):  # PyRIT csvs open with '# dataset_version' comment lines
        lines.pop(0)
    return list(csv.DictReader(lines))


def _none(s: str | None) -> str | None:
    return None if s is None or s == "" else s


def xstest(paths: list[Path]) -> bytes:
    """xstest_prompts.csv → rows ``id, prompt, type, label, focus, note, should_refuse`` (empty → null)."""
    return _dump([{"id": int(r["id"]), "prompt": r["prompt"], "type": r["type"], "label": r["label"],
                   "focus": _none(r["focus"]), "note": _none(r["note"]), "should_refuse": r["label"] == "unsafe"}
                  for r in _csv(paths[0].read_bytes())])


def advbench(paths: list[Path]) -> bytes:
    """harmful_behaviors.csv (goal, target) → rows ``id, prompt, target, harmful, source``."""
    return _dump([{"id": i, "prompt": r["goal"], "target": r["target"], "harmful": True, "source": "advbench"}
                  for i, r in enumerate(_csv(paths[0].read_bytes()))])


def jbb(paths: list[Path]) -> bytes:
    """harmful + benign behaviour CSVs → 200 rows; header case-insensitive, behaviour whitespace normalised."""
    out = []
    for p, harmful in zip(paths, (True, False)):
        for r in _csv(p.read_bytes()):
            r = {k.lower(): v for k, v in r.items()}
            out.append({"index": int(r[""] if "" in r else r["index"]), "prompt": r["goal"], "target": r["target"],
                        "behavior": " ".join(r["behavior"].split()), "category": r["category"], "source": r["source"],
                        "harmful": harmful})
    return _dump(out)


def pyrit_refusal(paths: list[Path]) -> bytes:
    """refusal.csv + refusal_extra.csv → rows ``id, objective, response, is_refusal, file``."""
    out = []
    for p in paths:
        for i, r in enumerate(_csv(p.read_bytes())):
            out.append({"id": f"{p.name.rsplit('.', 1)[0]}-{i}", "objective": r["objective"],
                        "response": r["assistant_response"], "is_refusal": bool(int(float(r["human_score"]))),
                        "file": p.name})
    return _dump(out)


_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _turns(t: str) -> list[dict[str, str]] | None:
    parts = _TURN.split(t)
    if parts[0].strip():
        return None
    return [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2])]


def _gz_rows(p: Path) -> list[tuple[int, dict[str, str]]]:
    lines = gzip.decompress(p.read_bytes()).decode("utf-8").splitlines()
    return [(i, json.loads(ln)) for i, ln in enumerate(lines) if ln.strip()]


def hh_harmless(paths: list[Path]) -> bytes:
    """harmless-base/test.jsonl.gz → context ``messages`` (ending with a user turn), ``chosen``, ``rejected``."""
    out = []
    for i, r in _gz_rows(paths[0]):
        c, rj = _turns(r["chosen"]), _turns(r["rejected"])
        if not c or not rj or c[-1]["role"] != "assistant" or rj[-1]["role"] != "assistant" or c[:-1] != rj[:-1]:
            continue
        ctx = c[:-1]
        if not ctx or ctx[-1]["role"] != "user":
            continue
        out.append({"id": i, "messages": ctx, "chosen": c[-1]["content"], "rejected": rj[-1]["content"],
                    "n_user_turns": sum(t["role"] == "user" for t in ctx)})
    return _dump(out)


def hh_helpful(paths: list[Path]) -> bytes:
    """helpful-{base,online,rejection-sampled}/test.jsonl.gz → the full chosen conversation as ``messages``."""
    out = []
    for p, subset in zip(paths, ("helpful-base", "helpful-online", "helpful-rejection-sampled")):
        for i, r in _gz_rows(p):
            c, rj = _turns(r["chosen"]), _turns(r["rejected"])
            if not c or not rj or c[:-1] != rj[:-1] or c[-1]["role"] != "assistant":
                continue
            if not all(t["role"] == ("user", "assistant")[k % 2] and t["content"] for k, t in enumerate(c)):
                continue
            out.append({"id": f"{subset}-{i}", "subset": subset, "messages": c})
    return _dump(out)


def truthfulqa_generation(paths: list[Path]) -> bytes:
    """TruthfulQA.csv (UTF-8 BOM) → rows with ``;``-split answer lists."""
    def split(s: str) -> list[str]:
        return [x.strip() for x in s.split(";") if x.strip()]

    return _dump([{"id": i, "type": r["Type"], "category": r["Category"], "question": r["Question"],
                   "best_answer": r["Best Answer"], "correct_answers": split(r["Correct Answers"]),
                   "incorrect_answers": split(r["Incorrect Answers"]), "source": r["Source"]}
                  for i, r in enumerate(_csv(paths[0].read_bytes(), "utf-8-sig"))])


def truthfulqa_mc(paths: list[Path]) -> bytes:
    """mc_task.json ({answer: 0/1} maps) → ``mc1_targets`` / ``mc2_targets`` as ``{choices, labels}``."""
    def targets(d: dict[str, int]) -> dict[str, list]:
        return {"choices": list(d), "labels": list(d.values())}

    rows = json.loads(paths[0].read_bytes().decode("utf-8"))
    return _dump([{"id": i, "question": r["question"], "mc1_targets": targets(r["mc1_targets"]),
                   "mc2_targets": targets(r["mc2_targets"])} for i, r in enumerate(rows)])


def _mmlu(split: str) -> Callable[[list[Path]], bytes]:
    def convert(paths: list[Path]) -> bytes:
        """data.tar → rows of data/<split>/<subject>_<split>.csv (no header), subjects sorted, rows in file order."""
        suffix = f"_{split}.csv"
        out = []
        with tarfile.open(paths[0]) as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.startswith(f"data/{split}/")
                              and m.name.endswith(suffix)), key=lambda m: m.name)
            if not members:
                raise SaesteerError(f"MMLU archive {paths[0].name} has no data/{split}/*{suffix} files")
            for m in members:
                subject = Path(m.name).name[: -len(suffix)]
                f = tar.extractfile(m)
                assert f is not None
                for i, row in enumerate(csv.reader(io.StringIO(f.read().decode("utf-8"), newline=""))):
                    q, *choices, letter = row
                    out.append({"id": f"{subject}-{'dev-' if split == 'dev' else ''}{i}", "subject": subject,
                                "question": q, "choices": choices, "answer": "ABCD".index(letter.strip()),
                                "answer_letter": letter.strip()})
        return _dump(out)

    return convert


CONVERTERS: dict[str, Callable[[list[Path]], bytes]] = {
    "xstest": xstest,
    "advbench": advbench,
    "jbb": jbb,
    "pyrit_refusal": pyrit_refusal,
    "hh_harmless": hh_harmless,
    "hh_helpful": hh_helpful,
    "truthfulqa_generation": truthfulqa_generation,
    "truthfulqa_mc": truthfulqa_mc,
    "mmlu_test": _mmlu("test"),
    "mmlu_dev": _mmlu("dev"),
}

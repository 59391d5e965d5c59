"""The one results format of sweeps and comparisons: ``results.jsonl`` rows (one per condition × group × metric,
with ``k``, ``n``, ``rate`` and its interval), written atomically, read back with one-line errors; per-condition
folders named by :func:`slug`; rates pooled over a group's data sets by :func:`pooled`."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from saesteer.core import SaesteerError, atomic_write_text, rate_summary

RESULTS = "results.jsonl"


def results_file(path: str | Path) -> Path:
    """``path`` itself when it names a file, else ``path / results.jsonl``."""
    p = Path(path)
    return p if p.suffix == ".jsonl" else p / RESULTS


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``results.jsonl`` (a run folder or the file); [] when there is none yet."""
    p = results_file(path)
    if not p.exists():
        return []
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise SaesteerError(f"{p}: line {i} is not valid JSON (delete the file to start over)") from None
    return rows


def write_results(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write all ``rows`` atomically (the file is replaced, never appended half-way)."""
    return atomic_write_text(results_file(path), "".join(json.dumps(r, default=str) + "\n" for r in rows))


def slug(name: str) -> str:
    """A condition's folder name: runs of anything but ``A-Za-z0-9._=-`` become ``_`` (at most 80 characters)."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_")[:80] or "condition"


def pooled(rows: Sequence[dict], group: str, condition: str | None = None) -> Any:
    """Rates pooled over a group's data sets (sum k / sum n, Wilson interval): ``{condition: summary}``, or with
    ``condition`` that condition's summary (None when it has no rows in the group)."""
    acc: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        if r.get("group") == group and r.get("k") is not None and (condition is None or r["condition"] == condition):
            acc[r["condition"]][0] += int(r["k"])
            acc[r["condition"]][1] += int(r["n"])
    out = {c: rate_summary(k, n) for c, (k, n) in acc.items()}
    return out if condition is None else out.get(condition)

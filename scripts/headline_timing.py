"""Issue 15 §5: the time a comparison's groups took, from the per-group ``seconds_group`` that ``saesteer compare``
stores on every result row (a resumed run keeps the groups an earlier run finished, with their own times).

    .venv/bin/python scripts/headline_timing.py runs/headline/compare-full [--into runs/headline/timings.json]

Prints seconds per condition and group and the total; ``--into`` adds them to a ``scripts/headline.sh`` timings file
(key ``compare_groups``), written atomically. The further judges' pass and the report are not groups: their time is
the last compare stage's wall time minus the groups that stage ran.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from saesteer.core import atomic_write_json
from saesteer.experiments.compare import LONG_BROKEN


def group_seconds(rows: list[dict]) -> dict[str, dict[str, float]]:
    """``{condition: {group: seconds}}``, each group counted once (its rows share one ``seconds_group``); the long
    answers' broken label is its own unit (``long-check: broken``)."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.get("seconds_group") is None:
            continue
        g = r["group"] + (": broken" if r.get("metric") == LONG_BROKEN else "")
        out.setdefault(r["condition"], {})[g] = float(r["seconds_group"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("compare", type=Path, help="a compare output folder (results.jsonl)")
    ap.add_argument("--into", type=Path, help="timings.json of scripts/headline.sh to add the groups to")
    a = ap.parse_args()
    rows = [json.loads(x) for x in (a.compare / "results.jsonl").read_text().splitlines() if x.strip()]
    per = group_seconds(rows)
    total = 0.0
    for cond, groups in per.items():
        s = sum(groups.values())
        total += s
        print(f"{cond:24s} {s:8.0f} s  " + "  ".join(f"{g} {v:.0f}" for g, v in groups.items()))
    print(f"{'all groups':24s} {total:8.0f} s  ({total / 3600:.2f} h)")
    if a.into:
        d = json.loads(a.into.read_text()) if a.into.exists() else {}
        d["compare_groups"] = {"seconds": per, "total_seconds": round(total, 1)}
        atomic_write_json(a.into, d)


if __name__ == "__main__":
    main()

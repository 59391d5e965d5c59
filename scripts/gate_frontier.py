"""Could *any* threshold of a gate meet issue 6's goal? A post-hoc sweep over a finished comparison's items.

A hard gate steers exactly the prompts it fires on, so with greedy decoding a gated condition's verdict on an item is
the unconditional clamp's verdict where the gate fires and the unsteered verdict where it does not. From the
per-item records of ``saesteer compare`` (unsteered, the clamp, and a gated condition that logged its gate scores)
this script predicts every threshold's outcome on the held-out sets, checks the prediction at the condition's own
threshold against what was measured, and reports the best gain kept under each over-refusal budget.

This is a diagnostic on the *test* items (it says where a gate's score ranking makes the goal reachable at all); it
is never used to choose a threshold — policies set theirs on validation prompts.

    .venv/bin/python scripts/gate_frontier.py --compare runs/lead/compare3 --condition clamp+probe-1.5b \\
        --out docs/results/gate_frontier_1.5b.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from saesteer.core import atomic_write_json  # noqa: E402
from saesteer.experiments import slug  # noqa: E402  (the compare's folder names)

UNSAFE = ("xstest_unsafe", "advbench_test", "jbb-harmful")
SAFE = ("xstest_safe", "jbb-benign")


def _items(root: Path, cond: str, subset: str) -> dict[str, dict]:
    f = root / "conditions" / slug(cond) / subset / "items.jsonl"
    if not f.exists():
        raise SystemExit(f"missing {f}: run saesteer compare with this condition first")
    return {r["prompt"]: r for r in map(json.loads, f.read_text().splitlines()) if r.get("error") is None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", required=True, help="output folder of saesteer compare")
    ap.add_argument("--condition", required=True, help="a gated condition with per-item gate scores")
    ap.add_argument("--clamp", default="clamp", help="the unconditional condition")
    ap.add_argument("--budgets", default="0,3,5,10", help="over-refusal budgets in pp (max over the safe sets)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    root = Path(args.compare)
    data = {}
    for sub in UNSAFE + SAFE:
        u, c, g = (_items(root, x, sub) for x in ("unsteered", args.clamp, args.condition))
        keys = sorted(set(u) & set(c) & set(g))
        data[sub] = [(g[k]["gate"]["score"], bool(g[k]["gate"]["fired"]), bool(g[k]["gate"].get("chat", True)),
                      bool(u[k]["label"]), bool(c[k]["label"]), bool(g[k]["label"])) for k in keys]
    thr = json.loads((root / "config.json").read_text())  # only to record where the items came from
    scores = sorted({s for rows in data.values() for s, *_ in rows})
    cands = [scores[0] - 1.0] + scores  # fire on rows with score > t

    def rates(t: float) -> dict[str, float]:
        out = {}
        for sub, rows in data.items():
            pred = [(c if (s > t and chat) else u) for s, _, chat, u, c, _ in rows]
            out[sub] = sum(pred) / len(pred)
        return out

    def pooled(r: dict[str, float], subs: tuple) -> float:
        n = {sub: len(data[sub]) for sub in subs}
        return sum(r[s] * n[s] for s in subs) / sum(n.values())

    base, full = rates(float("inf")), rates(float("-inf"))
    gain = pooled(full, UNSAFE) - pooled(base, UNSAFE)
    curve = []
    for t in cands:
        r = rates(t)
        kept = (pooled(r, UNSAFE) - pooled(base, UNSAFE)) / gain if gain > 0 else float("nan")
        over = max(r[s] - base[s] for s in SAFE)
        curve.append({"threshold": t, "gain_kept": kept, "max_safe_increase_pp": 100 * over,
                      **{f"{s}": r[s] for s in UNSAFE + SAFE}})
    # the prediction at the condition's own decisions vs what the gated run measured
    measured = {sub: sum(r[5] for r in rows) / len(rows) for sub, rows in data.items()}
    own = {sub: sum((c if fired else u) for _, fired, _, u, c, _ in rows) / len(rows) for sub, rows in data.items()}
    best = {}
    for b in (float(x) for x in args.budgets.split(",")):
        ok = [p for p in curve if p["max_safe_increase_pp"] <= b + 1e-9]
        best[f"<= {b:g} pp"] = max(ok, key=lambda p: p["gain_kept"]) if ok else None
    print(f"{args.condition}: n = " + ", ".join(f"{s} {len(r)}" for s, r in data.items()))
    print(f"unsteered → clamp pooled unsafe {100 * pooled(base, UNSAFE):.1f} → {100 * pooled(full, UNSAFE):.1f} %")
    print("prediction check (predicted from the condition's own gate decisions vs measured):")
    for sub in data:
        print(f"  {sub:14s} predicted {100 * own[sub]:5.1f} %  measured {100 * measured[sub]:5.1f} %")
    print("best threshold (on these test items) per over-refusal budget:")
    for k, p in best.items():
        print(f"  {k:>9}: " + ("none" if p is None else
                                f"gain kept {100 * p['gain_kept']:.0f} %, safe +{p['max_safe_increase_pp']:.1f} pp "
                                f"(threshold {p['threshold']:.3f})"))
    if args.out:
        atomic_write_json(args.out, {"command": " ".join(sys.argv), "condition": args.condition,
                                     "compare_out": thr.get("out"), "n": {s: len(r) for s, r in data.items()},
                                     "unsteered": base, "clamp": full, "predicted_at_own_decisions": own,
                                     "measured": measured, "best_per_budget": best, "curve": curve})
        print("wrote", args.out)


if __name__ == "__main__":
    main()

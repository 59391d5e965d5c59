"""compare's per-set checks: paired difference vs unsteered (Newcombe / McNemar) and a second judge's agreement
(Cohen's kappa, hand-computed 2x2) on the very same stored answers, the broken split in the report, and the
long-answer verdict check on a tiny model with fake judges."""

from __future__ import annotations

import json

import pytest

from saesteer.core import mcnemar_exact, paired_diff_interval, rate_summary
from saesteer.evals import Verdict
from saesteer.experiments import CompareConfig
from saesteer.experiments.compare import (
    _long_check,
    _long_rejudge,
    annotate_rows,
    broken_pooled,
    detail_table,
    judges_pooled,
    write_report,
)

SPEC = "jbb-harmful"


def _items(labels, answers=None):
    return [{"id": str(i), "subset": SPEC, "prompt": f"request {i}", "answer": (answers or {}).get(i, f"answer {i}"),
             "label": lab} for i, lab in enumerate(labels)]


def _write(out, cond, items):
    d = out / "conditions" / cond / SPEC
    d.mkdir(parents=True)
    (d / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))


class MarkedJudge:
    """A second judge: refusal iff the stored answer contains 'NO'."""

    name = "marked"

    def __init__(self):
        self.seen = []

    def judge(self, prompts, answers):
        self.seen += list(answers)
        return [Verdict("NO" in a) for a in answers]


def _row(cond, labels):
    k = sum(x for x in labels if x is not None)
    n = sum(x is not None for x in labels)
    return {"condition": cond, "gate": "none", "steer": "", "group": "unsafe", "metric": SPEC, "dataset": SPEC,
            **rate_summary(k, n)}


def test_paired_and_second_judge_on_stored_answers(tmp_path):
    # unsteered vs gated on the same 12 prompts: a=3 both refuse, b=6 gated only, c=1 unsteered only, d=2 neither
    base = [True] * 3 + [False] * 6 + [True] + [False] * 2
    gated = [True] * 3 + [True] * 6 + [False] + [False] * 2
    # the second judge on the gated answers: 2x2 vs the primary over 10 decided items (two items it cannot see:
    # primary None), both refusal 4, primary only 1, second only 2, neither 3 -> kappa (0.7 - 0.5) / 0.5 = 0.4
    prim = [True] * 4 + [True] + [False] * 2 + [False] * 3 + [None, None]
    second = [True] * 4 + [False] + [True] * 2 + [False] * 3 + [True, False]
    _write(tmp_path, "unsteered", _items(base))
    _write(tmp_path, "gated", _items(gated))
    _write(tmp_path, "judged", _items(prim, {i: "NO thanks" if s else "fine" for i, s in enumerate(second)}))
    rows = [_row("unsteered", base), _row("gated", gated), _row("judged", prim)]
    j = MarkedJudge()
    cfg = CompareConfig(judge="prefix", judges=["prefix", "marked"])
    said = []
    out = annotate_rows(rows, cfg, tmp_path, make=lambda spec: j, say=said.append)
    assert said == [f"[compare] judge marked: {c} / {SPEC}, 12 answers …" for c in ("unsteered", "gated", "judged")]
    p = out[1]["paired"]
    assert (p["a"], p["b"], p["c"], p["d"], p["n"]) == (3, 6, 1, 2, 12)
    assert (p["diff"], p["ci_low"], p["ci_high"]) == pytest.approx(paired_diff_interval(3, 6, 1, 2))
    assert p["mcnemar_p"] == pytest.approx(mcnemar_exact(6, 1)) and p["diff"] == pytest.approx(5 / 12)
    assert "paired" not in out[0]  # the baseline itself
    k = out[2]["judges"]["marked"]
    assert k["kappa"] == pytest.approx(0.4) and k["agreement"] == pytest.approx(0.7) and k["n_both"] == 10
    assert (k["k"], k["n"]) == (7, 12)  # the second judge's own refusal rate over everything it decided
    assert k["cells"] == {"both": 4, "primary_only": 1, "judge_only": 2, "neither": 3}
    # pooled per condition (one unsafe set here) and over every condition: the marked judge calls every "answer i"
    # compliance, so unsteered adds 4 primary-only + 8 neither and gated 9 + 3 to the judged condition's cells
    pooled = {p["condition"]: p for p in judges_pooled(out)}
    assert list(pooled) == ["unsteered", "gated", "judged", "all"]
    pj = pooled["judged"]
    assert (pj["unsafe"], pj["safe"]["n"]) == ({"n": 10, "primary": 0.5, "judge": 0.6}, 0)
    assert pj["kappa"] == pytest.approx(0.4) and pj["agreement"] == pytest.approx(0.7)
    a = pooled["all"]
    po, pa, pb = 18 / 34, 18 / 34, 6 / 34  # cells both 4, primary only 14, judge only 2, neither 14
    pe = pa * pb + (1 - pa) * (1 - pb)
    assert a["n"] == 34 and a["kappa"] == pytest.approx((po - pe) / (1 - pe)) and a["agreement"] == pytest.approx(po)
    # judged once per eval folder, stored beside items.jsonl: a re-run judges nothing again
    assert (tmp_path / "conditions" / "judged" / SPEC / "judged_marked.jsonl").exists()
    n_seen = len(j.seen)
    said.clear()
    annotate_rows(rows, cfg, tmp_path, make=lambda spec: j, say=said.append)
    assert len(j.seen) == n_seen == 36 and said == []
    md = detail_table(out)
    assert "| gated | jbb-harmful | 12 |" in md and "41.7 [" in md and f"{mcnemar_exact(6, 1):.3g}" in md
    assert "marked: refusal % · κ · agreement %" in md and "0.40 · 70.0 (n=10)" in md
    assert "| judged | marked | 10 | 50.0 · 60.0 | 0 | – · – | 0.40 | 70.0 |" in md
    # the report's table.md carries the detail table under the main one
    paths = write_report(out, tmp_path / "report")
    assert "McNemar p" in paths["table.md"].read_text()


def test_detail_table_outcome_split():
    o = {"refusal": rate_summary(5, 10), "compliance": rate_summary(3, 10), "broken": rate_summary(2, 10)}
    md = detail_table([dict(_row("clamp", [True] * 7 + [False] * 3), outcomes=o)])
    assert "| clamp | jbb-harmful | 10 | 70.0 | 50.0 / 30.0 / 20.0 |" in md
    assert detail_table([_row("clamp", [True])]) == ""


def test_broken_pooled_per_condition(tmp_path):
    # clamp: unsafe sets 1/10 and 2/5 broken, safe 0/4; scored counts come from the stored items (n_tokens >= 4)
    def row(group, spec, k, n, judged_refusal=0):
        o = {"refusal": rate_summary(0, n), "compliance": rate_summary(n - k, n), "broken": rate_summary(k, n),
             "broken_judged_refusal": judged_refusal}
        return {"condition": "clamp", "gate": "none", "steer": "", "group": group, "metric": spec, "dataset": spec,
                **rate_summary(0, n), "outcomes": o}

    rows = [row("unsafe", "a", 1, 10, 1), row("unsafe", "b", 2, 5), row("safe", "c", 0, 4)]
    for r, toks in zip(rows, ([3] * 6 + [10] * 4, [24] * 5, [3, 3, 3, 3])):
        d = tmp_path / "conditions" / "clamp" / r["dataset"]
        d.mkdir(parents=True)
        items = [{"id": str(i), "subset": r["metric"], "prompt": "p", "answer": "a", "label": False, "n_tokens": t,
                  "broken": False} for i, t in enumerate(toks)]
        (d / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    out = annotate_rows(rows, CompareConfig(judges=[]), tmp_path)
    assert [r["broken_scored"] for r in out] == [4, 5, 0]
    (b,) = broken_pooled(out)
    assert (b["unsafe"]["k"], b["unsafe"]["n"], b["unsafe"]["scored"]) == (3, 15, 9)
    assert (b["safe"]["k"], b["safe"]["n"], b["safe"]["scored"]) == (0, 4, 0) and b["judged_refusal"] == 1
    md = detail_table(out)
    # the safe side scored no answer: no rate is claimed for it
    assert "| clamp | 20.0 [7, 45] n=15 | 9 / 15 | not measured (0 scored) | 0 / 4 | 1 |" in md
    # and the per-row split says the same of that row's broken share, while the scored rows keep theirs
    split = {line.split(" | ")[1]: line.split(" | ")[4] for line in md.splitlines() if line.startswith("| clamp | ")
             and len(line.split(" | ")) > 6}
    assert split == {"a": "0.0 / 90.0 / 10.0", "b": "0.0 / 60.0 / 40.0", "c": "0.0 / 100.0 / not measured"}, split
    # rows from before the scored count: the pooled rate still shows, the scored column says unknown
    (b2,) = broken_pooled(rows)
    assert b2["unsafe"]["k"] == 3 and b2["unsafe"]["scored"] is None
    assert broken_pooled([_row("clamp", [True])]) == []


class LengthJudge:
    """Refusal iff the answer is short (the stored 4-token answers), so every long answer flips."""

    name = "length"

    def judge(self, prompts, answers):
        return [Verdict(len(a) < 12) for a in answers]


class AlwaysComply:
    name = "comply"

    def judge(self, prompts, answers):
        return [Verdict(False) for _ in answers]


def test_long_answer_verdict_check(tiny, tmp_path):
    from saesteer.generation import generate

    model, tok = tiny
    prompts = [f"tell me about topic {i}" for i in range(6)]
    short = generate(model, tok, prompts, max_new_tokens=2)
    _write(tmp_path, "unsteered", [dict(r, answer=a) for r, a in zip(_items([True] * 6), short)])
    cfg = CompareConfig(judge="length", judges=["comply"], unsafe=[SPEC], safe=[], long_check=4, long_tokens=24)
    judges = {"length": LengthJudge(), "comply": AlwaysComply()}
    cond = {"condition": "unsteered", "gate": "none", "steer": "", "policy": None}
    rows = _long_check(model, tok, cfg, cond, tmp_path, make=lambda s: judges[s])
    by = {r["judge"]: r for r in rows}
    assert by["length"]["n"] == 4 and by["length"]["long_tokens"] == 24
    checked = [json.loads(x) for x in (tmp_path / "conditions" / "unsteered" / "long_check.jsonl").read_text().splitlines()]
    assert len(checked) == 4 and all(len(c["long_answer"]) > len(c["short_answer"]) for c in checked)
    flips = sum(c["verdicts"]["length"]["short"] != c["verdicts"]["length"]["long"] for c in checked)
    assert by["length"]["k"] == flips >= 1 and by["length"]["refusal_to_compliance"] == flips
    assert by["comply"]["k"] == 0 and by["comply"]["n"] == 4  # a judge that cannot flip never does
    # the long answers are the model's own greedy continuations of the short ones
    assert all(c["long_answer"].startswith(c["short_answer"]) for c in checked)
    assert "verdict changed at long answers" in detail_table(rows)


def test_a_judge_added_later_reads_the_stored_long_answers(tiny, tmp_path):
    # the check ran with the length judge only; a rerun naming a further judge has it read the stored pairs, adds its
    # verdicts to long_check.jsonl (the earlier ones kept) and one "verdict changed" row; a third run adds nothing
    model, tok = tiny
    from saesteer.generation import generate

    prompts = [f"tell me about topic {i}" for i in range(6)]
    short = generate(model, tok, prompts, max_new_tokens=2)
    _write(tmp_path, "unsteered", [dict(r, answer=a) for r, a in zip(_items([True] * 6), short)])
    cond = {"condition": "unsteered", "gate": "none", "steer": "", "policy": None}
    judges = {"length": LengthJudge(), "marked": MarkedJudge()}
    first = CompareConfig(judge="length", judges=[], unsafe=[SPEC], safe=[], long_check=4, long_tokens=24)
    _long_check(model, tok, first, cond, tmp_path, make=lambda s: judges[s])
    path = tmp_path / "conditions" / "unsteered" / "long_check.jsonl"
    before = [json.loads(x) for x in path.read_text().splitlines()]
    later = CompareConfig(judge="length", judges=["marked"], unsafe=[SPEC], safe=[], long_check=4, long_tokens=24)
    built = {}
    rows = _long_rejudge(later, cond, tmp_path, built, make=lambda s: judges[s])
    assert [r["judge"] for r in rows] == ["marked"] and rows[0]["n"] == 4 and rows[0]["k"] == 0
    after = [json.loads(x) for x in path.read_text().splitlines()]
    assert [a["verdicts"]["length"] for a in after] == [b["verdicts"]["length"] for b in before]
    assert sorted(judges["marked"].seen) == sorted([c["short_answer"] for c in before] + [c["long_answer"] for c in before])
    assert all(a["verdicts"]["marked"] == {"short": "NO" in a["short_answer"], "long": "NO" in a["long_answer"]}
               for a in after)
    assert _long_rejudge(later, cond, tmp_path, built, make=lambda s: judges[s]) == []
    assert all(a["judged_specs"] == ["length", "marked"] for a in after)
    # a report-only rerun (a new process: nothing built) builds no judge: every spec has read the check

    def no_build(spec):
        raise AssertionError(f"built {spec}")

    assert _long_rejudge(later, cond, tmp_path, {}, make=no_build) == []
    # a check stored before the specs were recorded: each judge is built once, finds its verdicts, and the specs are
    # recorded, so the next rerun builds none
    path.write_text("".join(json.dumps({k: v for k, v in a.items() if k != "judged_specs"}) + "\n" for a in after))
    made = []
    assert _long_rejudge(later, cond, tmp_path, {}, make=lambda s: made.append(s) or judges[s]) == []
    assert made == ["length", "marked"] and _long_rejudge(later, cond, tmp_path, {}, make=no_build) == []
    # and the primary-vs-further agreement on the long answers now has the new judge
    out = annotate_rows([dict(rows[0], group="long-check")], later, tmp_path, make=lambda s: judges[s])
    assert out[0]["vs_primary"]["n"] == 4


def test_second_judge_on_a_seeded_sample(tmp_path):
    # 12 stored answers per condition, the second judge limited to 5: it reads 5 answers per condition, the same ids
    # for both conditions, and kappa / agreement / n are over those 5 only (no unjudged item counts as a failure)
    base = [True, False] * 6
    _write(tmp_path, "unsteered", _items(base, {i: "NO" if b else "fine" for i, b in enumerate(base)}))
    _write(tmp_path, "gated", _items([True] * 12, {i: "NO" for i in range(12)}))
    rows = [_row("unsteered", base), _row("gated", [True] * 12)]
    j = MarkedJudge()
    out = annotate_rows(rows, CompareConfig(judges=["marked"], judges_limit=5, seed=3), tmp_path, make=lambda s: j)
    assert len(j.seen) == 10
    ids = [[json.loads(x)["id"] for x in (tmp_path / "conditions" / c / SPEC / "judged_marked_n5.jsonl").read_text()
            .splitlines()] for c in ("unsteered", "gated")]
    assert ids[0] == ids[1] and len(set(ids[0])) == 5
    for r in out:
        k = r["judges"]["marked"]
        assert k["n"] == k["n_both"] == 5 and k["n_failed"] == 0 and k["agreement"] == 1.0


def _long_rows(verdicts):
    return [{"id": str(i), "subset": SPEC, "short_answer": "No", "long_answer": "No, I won't.",
             "verdicts": {"prefix": {"short": p, "long": p}, "marked": {"short": True, "long": m}}}
            for i, (p, m) in enumerate(verdicts)]


def test_second_judge_against_the_primary_on_long_answers(tmp_path):
    # long answers of two conditions, both judges' verdicts stored by _long_check (primary first):
    # "gated": both 3, primary only 1, judge only 2, neither 4 -> po 0.7, pe 0.4*0.5 + 0.6*0.5 = 0.5, kappa 0.4;
    # one item the primary could not decide is left out
    gated = [(True, True)] * 3 + [(True, False)] + [(False, True)] * 2 + [(False, False)] * 4 + [(None, True)]
    unst = [(True, True)] * 5 + [(False, True)] * 5  # a judge that says refusal to everything: kappa 0
    for cond, v in (("gated", gated), ("unsteered", unst)):
        d = tmp_path / "conditions" / cond
        d.mkdir(parents=True)
        (d / "long_check.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _long_rows(v)))
    rows = [{"condition": c, "group": "long-check", "metric": f"verdict changed ({j})", "judge": j, **rate_summary(0, 10)}
            for c in ("unsteered", "gated") for j in ("prefix", "marked")]
    out = annotate_rows(rows, CompareConfig(judges=[]), tmp_path)
    assert "vs_primary" not in out[0] and "vs_primary" not in out[2]  # the primary judge against itself: nothing
    v = out[3]["vs_primary"]
    assert v["primary"] == "prefix" and v["n"] == 10
    assert v["cells"] == {"both": 3, "primary_only": 1, "judge_only": 2, "neither": 4}
    assert v["kappa"] == pytest.approx(0.4) and v["agreement"] == pytest.approx(0.7)
    assert (v["primary_rate"], v["judge_rate"]) == (pytest.approx(0.4), pytest.approx(0.5))
    assert out[1]["vs_primary"]["kappa"] == pytest.approx(0.0) and out[1]["vs_primary"]["judge_rate"] == 1.0
    # pooled over both conditions: both 8, primary only 1, judge only 7, neither 4 (n = 20)
    from saesteer.evals import cohen_kappa
    from saesteer.experiments.compare import long_agreement_pooled

    a = {r["condition"]: r for r in long_agreement_pooled(out)}["all"]
    prim = [True] * 9 + [False] * 11
    other = [True] * 8 + [False] + [True] * 7 + [False] * 4
    assert a["n"] == 20 and a["kappa"] == pytest.approx(cohen_kappa(prim, other))
    assert a["agreement"] == pytest.approx(12 / 20)
    md = detail_table(out)
    assert "| gated | marked | 10 | 40.0 · 50.0 | 0.40 | 70.0 |" in md
    assert "| all | marked | 20 | 45.0 · 75.0 |" in md


def test_second_judge_reports_the_length_of_the_answers_it_read(tmp_path):
    # stored answers cut by the early stop: the detail table says how long the answers the further judge read were
    items = [dict(it, n_tokens=t) for it, t in zip(_items([True, False, True, False]), (1, 2, 3, 24))]
    _write(tmp_path, "unsteered", items)
    out = annotate_rows([_row("unsteered", [True, False, True, False])], CompareConfig(judges=["marked"]), tmp_path,
                        make=lambda s: MarkedJudge())
    assert out[0]["judges"]["marked"]["answer_tokens"] == [1, 2, 3, 24]
    assert judges_pooled(out)[0]["answer_tokens_median"] == 2.5
    md = detail_table(out)
    assert "(n=4, median 2.5 tokens)" in md and "| 50.0 | 2.5 |" in md
    # a set the further judge did not read gets a dash in its column (it used to raise)
    o = {"refusal": rate_summary(1, 2), "compliance": rate_summary(1, 2), "broken": rate_summary(0, 2)}
    md = detail_table(out + [dict(_row("clamp", [True, False]), outcomes=o)])
    assert "| clamp | jbb-harmful | 2 | 50.0 | 50.0 / 50.0 / 0.0 | – | – | – |" in md


def test_broken_label_of_the_long_answers(tiny, tmp_path):
    # the long-check answers (no early stop) get the broken label: scored by the unsteered model against the
    # unsteered condition's own long answers; a degenerate repetition is broken whatever its likelihood
    from saesteer.experiments.compare import LONG_BROKEN, _long_broken

    model, tok = tiny
    texts = ["Sure, here is a short plan for the trip.", "I can help with that: first, check the map.",
             "Here are three ideas for the party.", "The answer depends on the size of the room.",
             "You can start by reading the manual.", "A good first step is to ask a friend."]
    rep = "the plan the plan the plan the plan the plan the plan the plan the plan"
    for cond, answers in (("unsteered", texts), ("clamp", texts[:5] + [rep])):
        _write(tmp_path, cond, [dict(it, prompt=f"question {i}") for i, it in enumerate(_items([False] * 6))])
        rows = [{"id": str(i), "subset": SPEC, "short_answer": a[:4], "long_answer": a, "verdicts": {}}
                for i, a in enumerate(answers)]
        (tmp_path / "conditions" / cond / "long_check.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = CompareConfig(unsafe=[SPEC], safe=[], long_check=6, long_tokens=64)
    conds = {c: {"condition": c, "gate": "none", "steer": "", "policy": None} for c in ("unsteered", "clamp")}
    base = _long_broken(model, tok, cfg, conds["unsteered"], tmp_path)
    steered = _long_broken(model, tok, cfg, conds["clamp"], tmp_path)
    assert base[0]["metric"] == steered[0]["metric"] == LONG_BROKEN and base[0]["n"] == steered[0]["n"] == 6
    stored = [json.loads(x) for x in (tmp_path / "conditions" / "clamp" / "long_check.jsonl").read_text().splitlines()]
    assert all("broken" in c and c["n_tokens"] > 0 for c in stored)
    assert stored[5]["broken"] and "repetition" in stored[5]["broken_why"]
    assert steered[0]["k"] == sum(c["broken"] for c in stored) and steered[0]["broken_why"]["repetition"] == 1
    assert steered[0]["loglik_threshold"] is not None  # six reference answers of the unsteered condition
    md = detail_table(steered)
    assert "broken at long answers" in md and "| clamp | " in md and "verdict changed" not in md
    assert _long_broken(model, tok, cfg, {**conds["clamp"], "condition": "none-stored"}, tmp_path) == []

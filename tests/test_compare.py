"""compare: table, goals, Pareto front and plot, resumability — on synthetic per-condition results."""

from __future__ import annotations

import json

import pytest
import torch

from saesteer.core import SaesteerError, rate_summary
from saesteer.experiments import CompareConfig, goals, markdown_table, pareto_front, run_compare, write_report
from saesteer.experiments.compare import pooled, read_results
from saesteer.gating import AlwaysGate, CastGate, Policy, ProbeGate
from saesteer.steering import SteeringSpec

# (condition, gate) -> {metric: (k, n)}
SYN = {
    ("unsteered", "none"): {"xstest-unsafe": (60, 100), "advbench:test": (70, 100), "xstest-safe": (10, 100),
                            "jbb-benign": (5, 100), "mmlu": (40, 100), "truthfulqa_mc1": (30, 100)},
    ("paper", "always"): {"xstest-unsafe": (95, 100), "advbench:test": (99, 100), "xstest-safe": (60, 100),
                          "jbb-benign": (50, 100), "mmlu": (20, 100), "truthfulqa_mc1": (25, 100)},
    ("gated", "probe"): {"xstest-unsafe": (92, 100), "advbench:test": (98, 100), "xstest-safe": (12, 100),
                         "jbb-benign": (6, 100), "mmlu": (40, 100), "truthfulqa_mc1": (30, 100)},
    ("bad", "cast"): {"xstest-unsafe": (70, 100), "advbench:test": (75, 100), "xstest-safe": (30, 100),
                      "jbb-benign": (5, 100), "mmlu": (35, 100), "truthfulqa_mc1": (30, 100)},
}
GROUP = {"xstest-unsafe": "unsafe", "advbench:test": "unsafe", "xstest-safe": "safe", "jbb-benign": "safe",
         "mmlu": "capability", "truthfulqa_mc1": "capability"}


def syn_rows():
    rows = []
    for (c, g), ms in SYN.items():
        for m, (k, n) in ms.items():
            rows.append({"condition": c, "gate": g, "steer": "clamp f1=5" if g != "none" else "", "group": GROUP[m],
                         "metric": m, **rate_summary(k, n)})
    return rows


def test_pooled_and_table():
    rows = syn_rows()
    p = pooled(rows, "unsafe", "gated")
    assert (p["k"], p["n"]) == (190, 200) and p["ci_low"] < 0.95 < p["ci_high"]
    md = markdown_table(rows)
    lines = md.strip().splitlines()
    assert lines[0].startswith("| condition | gate | steering | xstest-unsafe | advbench:test | unsafe (pooled)")
    assert len(lines) == 2 + 4
    assert "| gated | probe | clamp f1=5 | 92.0 [" in md and "n=100" in md and "95.0 [" in md
    assert lines[0].endswith("| gate fired % (unsafe/safe/capability) |") and lines[2].endswith("| –/–/– |")
    rows2 = [dict(r, gate_fire_rate=0.5 if r["group"] == "safe" else 1.0) for r in rows]
    rows2[2]["gate_fire_rate"], rows2[3]["n"] = 0.1, 300  # xstest-safe 10 % of 100, jbb-benign 50 % of 300
    assert markdown_table(rows2).strip().splitlines()[2].endswith(f"| 100/{100 * (10 + 150) / 400:.0f}/100 |")


def test_goals_hand_computed():
    g = goals(syn_rows())
    assert g["baseline"] == "unsteered" and g["unconditional"] == "paper"
    good = g["conditions"]["gated"]
    # unsafe pooled: base 130/200, paper 194/200, gated 190/200 -> kept (0.95-0.65)/(0.97-0.65)
    assert good["unsafe_gain_kept"]["value"] == pytest.approx((0.95 - 0.65) / (0.97 - 0.65))
    assert good["xstest-safe_increase_pp"]["value"] == pytest.approx(2.0)
    assert good["mmlu_change_pp"]["value"] == pytest.approx(0.0) and good["all_ok"]
    bad = g["conditions"]["bad"]
    assert not bad["unsafe_gain_kept"]["ok"] and not bad["xstest-safe_increase_pp"]["ok"]
    assert not bad["mmlu_change_pp"]["ok"] and not bad["all_ok"]
    assert "paper" not in g["conditions"] and "unsteered" not in g["conditions"]


def test_pareto_front():
    pts = [("a", 0.1, 0.6), ("b", 0.5, 0.97), ("c", 0.12, 0.95), ("d", 0.3, 0.7), ("e", 0.1, 0.6)]
    # d is dominated by c; a and e tie (neither strictly dominates the other)
    assert pareto_front(pts) == {"a", "b", "c", "e"}


def test_write_report(tmp_path):
    rows = syn_rows()
    paths = write_report(rows, tmp_path)
    assert set(paths) == {"table.md", "goals.json", "pareto.png", "table.html"}
    from PIL import Image

    im = Image.open(paths["pareto.png"]).convert("L")
    assert im.size[0] > 400 and len(set(im.tobytes())) > 10  # a real plot, not a blank canvas
    page = paths["table.html"].read_text()
    assert "data:image/png;base64," in page and "<td>gated</td>" in page and "src=\"http" not in page
    assert json.loads(paths["goals.json"].read_text())["conditions"]["gated"]["all_ok"] is True
    with pytest.raises(SaesteerError):
        write_report([], tmp_path)


def _policy_file(tmp_path, name, kind):
    spec = SteeringSpec(kind="add", direction="d.safetensors", alpha=1.0, layer=0)
    gate = AlwaysGate(layer=0) if kind == "always" else ProbeGate(layer=0, positions=2)
    if kind != "always":
        gate.load_tensors({"mean": torch.zeros(4), "std": torch.ones(4), "coef": torch.ones(4), "intercept": torch.tensor(0.0)})
    p = tmp_path / f"{name}.json"
    Policy(gate=gate, steering=[spec], name=name).save(p)
    return str(p)


def test_run_compare_resumes_per_condition_and_group(tmp_path, data_root):
    calls = []
    boom = {"on": True}

    def runner(model, tok, cfg, cond, group, out):
        calls.append((cond["condition"], group))
        if boom["on"] and cond["condition"] == "gated" and group == "safe":
            raise RuntimeError("interrupted")
        ms = [m for m, g in GROUP.items() if g == group]
        return [{"condition": cond["condition"], "gate": cond["gate"], "steer": cond["steer"], "group": group,
                 "metric": m, **rate_summary(*SYN[(cond["condition"], cond["gate"])][m])} for m in ms]

    pols = [_policy_file(tmp_path, "paper", "always"), _policy_file(tmp_path, "gated", "probe")]
    cfg = CompareConfig(policies=pols, out=str(tmp_path / "cmp"), multiturn=False, capability=["mmlu"])
    with pytest.raises(RuntimeError):
        run_compare(None, None, cfg, runner=runner, say=lambda s: None)
    done = {(r["condition"], r["group"]) for r in read_results(cfg.out)}
    assert done == {("unsteered", "unsafe"), ("unsteered", "safe"), ("unsteered", "capability"),
                    ("paper", "unsafe"), ("paper", "safe"), ("paper", "capability"), ("gated", "unsafe")}
    calls.clear()
    boom["on"] = False
    said = []
    rows = run_compare(None, None, cfg, runner=runner, say=said.append)
    assert calls == [("gated", "safe"), ("gated", "capability")]
    # where the run stands among its 3 conditions x 3 groups, with the time left from the finished groups
    starts = [m for m in said if m.endswith(")") and " … (group " in m]
    assert [m.split(" … ")[0] for m in starts] == ["[compare] gated / safe", "[compare] gated / capability"]
    assert "(group 8 of 9 · 0:00:0" in starts[0] and "left)" in starts[0]
    assert len(rows) == 3 * 6
    assert (tmp_path / "cmp" / "table.md").exists() and (tmp_path / "cmp" / "pareto.png").exists()
    # duplicate names are refused
    with pytest.raises(SaesteerError, match="duplicate"):
        run_compare(None, None, CompareConfig(policies=[pols[0], pols[0]], out=str(tmp_path / "c2")), runner=runner)


def test_overall_progress_estimates_the_time_left_from_finished_groups():
    from saesteer.experiments.compare import overall_progress

    units = [(c, g) for c in ("unsteered", "clamp", "gated") for g in ("unsafe", "capability", "long-check")]
    rows = [{"condition": "unsteered", "group": "unsafe", "seconds_group": 100.0},
            {"condition": "unsteered", "group": "unsafe", "seconds_group": 100.0},  # one unit, several rows
            {"condition": "unsteered", "group": "capability", "seconds_group": 600.0},
            {"condition": "unsteered", "group": "long-check"},  # finished in an older run: no seconds
            {"condition": "clamp", "group": "unsafe", "seconds_group": 300.0}]
    # left: clamp capability 600 + clamp long-check (no long-check timing: the mean 1000/3) + gated unsafe (mean of
    # 100 and 300 = 200) + gated capability 600 + gated long-check 1000/3 -> 2066.67 s
    assert overall_progress(rows, units, 3725.0) == "(group 5 of 9 · 1:02:05 this run · ~0:34:27 left)"
    assert overall_progress([], units, 0.0) == "(group 1 of 9 · 0:00:00 this run)"  # nothing finished: no estimate


def _tiny_gate_inputs(model, tok, tmp_path):
    """A random direction file, the gate positions and gate inputs of 2 + 2 prompts on the tiny model."""
    from saesteer.gating import collect_gate_inputs, post_instruction_positions
    from saesteer.steering import RefusalDirection, save_direction

    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    dpath = save_direction(RefusalDirection(vector=torch.randn(d, generator=g) * 4, layer=1, model="tiny-llama"),
                           tmp_path / "dir")
    P = post_instruction_positions(tok)
    h = collect_gate_inputs(model, tok, ["how do i make a cake?", "what is the capital of france?",
                                         "explain photosynthesis", "the quick brown fox"], 1, P, progress=False)
    return dpath, P, h


def test_run_compare_with_real_eval_modules_on_tiny_model(tiny, tmp_path, data_root):
    """The default runner drives evals.refusal / multiturn / capability with a gated policy installed."""
    model, tok = tiny
    dpath, P, h = _tiny_gate_inputs(model, tok, tmp_path)
    gate = CastGate(layer=1, positions=P).fit(h[:2], h[2:])
    gate.threshold = 0.0
    pol = tmp_path / "gated.json"
    Policy(gate=gate, steering=[SteeringSpec(kind="add", direction=str(dpath), alpha=1.0)], name="gated").save(pol)
    cfg = CompareConfig(policies=[str(pol)], out=str(tmp_path / "cmp"), unsafe=["advbench:test"], safe=["jbb-benign"],
                        limit=3, max_new_tokens=6, multiturn_limit=2, max_turns=2, capability=["mmlu"],
                        capability_limit=2, batch_size=4, progress=False, long_check=2, long_tokens=8)
    rows = run_compare(model, tok, cfg, say=lambda s: None)
    by = {(r["condition"], r["metric"]): r for r in rows}
    assert by[("unsteered", "advbench-test")]["n"] == 3 and by[("gated", "jbb-benign")]["n"] == 3
    # the long-answer check's answers get the broken label once per condition, also when the run is resumed
    from saesteer.experiments.compare import LONG_BROKEN

    assert by[("unsteered", LONG_BROKEN)]["n"] == by[("gated", LONG_BROKEN)]["n"] == 2
    again = run_compare(model, tok, cfg, say=lambda s: None)
    assert sum(r.get("metric") == LONG_BROKEN for r in again) == 2 and len(again) == len(rows)
    assert by[("gated", "mmlu")]["n"] == 2 and by[("gated", "multiturn-asr")]["n"] == 2
    for m in ("advbench-test", "jbb-benign", "multiturn-refusal", "mmlu"):
        fr = by[("gated", m)]["gate_fire_rate"]
        assert fr is not None and 0.0 <= fr <= 1.0
        assert by[("unsteered", m)].get("gate_fire_rate") is None
    assert (tmp_path / "cmp" / "conditions" / "gated" / "advbench_test" / "items.jsonl").exists()
    # refusal rows carry the refusal / compliance / broken split, and the policy's rows their paired difference vs unsteered
    o = by[("gated", "jbb-benign")]["outcomes"]
    assert sum(o[k]["k"] for k in ("refusal", "compliance", "broken")) == 3
    assert by[("gated", "advbench-test")]["paired"]["n"] == 3 and "paired" not in by[("unsteered", "advbench-test")]
    assert "McNemar p" in (tmp_path / "cmp" / "table.md").read_text()
    assert "| gated | cast | add dir x1 |" in (tmp_path / "cmp" / "table.md").read_text()


def test_held_out_exclusions_leave_out_fit_prompts(tmp_path, data_root):
    from saesteer.data import load_prompts
    from saesteer.experiments import held_out_exclusions
    from saesteer.experiments.compare import policy_conditions
    from saesteer.gating import load_policy, load_slice, text_key

    items = load_prompts("jbb-benign")
    train = load_slice("jbb-benign#0:0.4", seed=3)
    val = load_slice("jbb-benign#0.4:0.6", seed=3)
    test = load_slice("jbb-benign#0.6:1", seed=3)
    ids = [{it.id for it in s} for s in (train, val, test)]
    assert len(ids[0]) == 40 and len(ids[1]) == 20 and len(ids[2]) == 40
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and ids[0] | ids[1] | ids[2] == {it.id for it in items}
    path = _policy_file(tmp_path, "gated", "probe")
    pol = load_policy(path)
    pol.meta["used_prompts"] = [text_key(it.prompt) for it in train + val]
    pol.save(path)
    conds = policy_conditions(CompareConfig(policies=[path], unsafe=["jbb-harmful"], safe=["jbb-benign"], limit=None))
    held = held_out_exclusions(CompareConfig(unsafe=["jbb-harmful"], safe=["jbb-benign"], limit=None), conds)
    assert held["jbb-harmful"] == [] and sorted(held["jbb-benign"]) == sorted(f"jbb-benign/{i}" for i in ids[0] | ids[1])
    held = held_out_exclusions(CompareConfig(unsafe=["jbb-harmful"], safe=["jbb-benign"], limit=10), conds)
    kept = {it.id for it in items} - {h.split("/", 1)[1] for h in held["jbb-benign"]}
    assert len(kept) == 10 and kept <= ids[2]
    # user exclusions by text hash (e.g. prompts a features selection used, whatever spec they came from)
    first = load_prompts("jbb-harmful")[:3]
    held = held_out_exclusions(CompareConfig(unsafe=["jbb-harmful"], safe=[], limit=None,
                                             exclude_ids=[f"text:{text_key(it.prompt)}" for it in first]), [])
    assert sorted(held["jbb-harmful"]) == sorted(f"jbb-harmful/{it.id}" for it in first)
    # spread-out sets (data.spread) built on a fitted prompt count it as seen: a conversation or document around a
    # training request is not a test item
    for spread in ("turns:jbb-benign", "embedded:jbb-benign"):
        held = held_out_exclusions(CompareConfig(unsafe=[], safe=[spread], limit=None), conds)
        kept = {h.split("/", 1)[1] for h in held[spread]}
        assert kept == {f"{spread.split(':')[0]}-{i}" for i in ids[0] | ids[1]}


def test_cli_exclude_ids_from_selection(tmp_path):
    from saesteer.cli.options import read_exclude
    from saesteer.gating import text_key

    sel = {"feature": 3, "clamp": 2.0, "prompts_used": {"validation": [
        {"spec": "advbench", "split": "train", "id": "4", "prompt": "Write a script"}]}}
    (tmp_path / "selection.json").write_text(json.dumps(sel))
    ids = read_exclude(tmp_path / "selection.json")
    assert set(ids) == {"advbench/4", "advbench:train/4", f"text:{text_key('Write a script')}"}
    (tmp_path / "ids.json").write_text('["a", 3]')
    assert read_exclude(tmp_path / "ids.json") == ["a", "3"]
    (tmp_path / "bad.json").write_text('{"x": 1}')
    with pytest.raises(SaesteerError):
        read_exclude(tmp_path / "bad.json")


def test_run_compare_reuses_unsteered_answers_for_untouched_rows(tiny, tmp_path, data_root):
    """With reuse on (the default) a gated policy's untouched rows take the unsteered condition's answers: a gate that
    never fires reproduces the unsteered answers and serves every row; a gate that fires on some gives the same rows
    as with reuse off."""
    model, tok = tiny
    dpath, P, h = _tiny_gate_inputs(model, tok, tmp_path)
    pols = []
    for name, thr in (("gated", 0.0), ("quiet", float("inf"))):
        gate = CastGate(layer=1, positions=P).fit(h[:2], h[2:])
        gate.threshold = thr
        pols.append(str(Policy(gate=gate, steering=[SteeringSpec(kind="add", direction=str(dpath), alpha=1.0)],
                               name=name).save(tmp_path / f"{name}.json")))
    runs = {}
    for reuse in (True, False):
        cfg = CompareConfig(policies=pols, out=str(tmp_path / f"cmp-{reuse}"), unsafe=["advbench:test"],
                            safe=["jbb-benign"], limit=4, max_new_tokens=6, multiturn_limit=2, max_turns=2,
                            capability=[], batch_size=4, progress=False, reuse_unsteered=reuse)
        runs[reuse] = {(r["condition"], r["metric"]): r for r in run_compare(model, tok, cfg, say=lambda s: None)}
    on, off = runs[True], runs[False]
    assert (tmp_path / "cmp-True" / "answers_unsteered.jsonl").exists()
    assert not (tmp_path / "cmp-False" / "answers_unsteered.jsonl").exists()
    for m in ("advbench-test", "jbb-benign"):
        assert on[("quiet", m)]["reused_answers"] == on[("quiet", m)]["n"] == 4  # every row served
        assert "reused_answers" not in off[("quiet", m)] and "reused_answers" not in on[("unsteered", m)]
        for c in ("gated", "quiet", "unsteered"):
            for k in ("k", "n", "gate_fire_rate"):
                assert on[(c, m)].get(k) == off[(c, m)].get(k), (c, m, k)

    def answers(run, cond):
        path = tmp_path / f"cmp-{run}" / "conditions" / cond / "jbb-benign" / "items.jsonl"
        return [json.loads(x)["answer"] for x in path.read_text().splitlines()]

    assert answers(True, "quiet") == answers(True, "unsteered") == answers(False, "quiet")
    assert on[("gated", "jbb-benign")]["reused_answers"] < 4 or on[("gated", "jbb-benign")]["gate_fire_rate"] == 0

"""Clamp sweeps: condition planning, held-out exclusions, results rows, resumability, steering really applied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saesteer.core import SaesteerError
from saesteer.experiments import sweep as sw
from test_capability import run_cli  # noqa: E402  (shared CLI runner)


def write_jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    from saesteer.sae import SAEConfig, TopKSAE, save_sae

    save_sae(TopKSAE(SAEConfig(d_in=64, num_latents=32, k=4, model="tiny-llama", layer=1), seed=1), tmp_path / "sae")
    fdir = tmp_path / "features"
    fdir.mkdir()
    sel = {"feature": 5, "clamp": 4.0, "control": 9,
           "prompts_used": {"discovery": [{"spec": "advbench:train", "id": "3", "prompt": "x"}],
                            "validation": [{"spec": "xstest", "id": "7", "prompt": "y"}]}}
    (fdir / "selection.json").write_text(json.dumps(sel))
    (fdir / "ranking.json").write_text(json.dumps({"metrics": {"max_act": [float(i) for i in range(32)]}}))
    data = tmp_path / "data"
    write_jsonl(data / "mmlu/mmlu_test.jsonl", [{"id": f"a-{i}", "subject": "anatomy", "question": f"the fox {i}?",
                                                 "choices": ["the", "a dog", "paris", "cake"], "answer": i % 4}
                                                for i in range(6)])
    write_jsonl(data / "mmlu/mmlu_dev.jsonl", [{"id": "a-dev-0", "subject": "anatomy", "question": "q",
                                                "choices": ["1", "2", "3", "4"], "answer": 0}])
    monkeypatch.setenv("SAESTEER_DATA", str(data))
    unsafe = write_jsonl(tmp_path / "unsafe.jsonl", [{"id": str(i), "prompt": f"how do i make a cake {i}?",
                                                      "label": "harmful", "category": "c" + str(i % 2)}
                                                     for i in range(4)])
    safe = write_jsonl(tmp_path / "safe.jsonl", [{"id": str(i), "prompt": f"what is the capital of france {i}?",
                                                  "label": "harmless"} for i in range(3)])
    return tmp_path, str(unsafe), str(safe)


def make_cfg(tmp_path, unsafe, safe, **kw):
    base = dict(out=str(tmp_path / "run"), model="tiny-llama", sae=str(tmp_path / "sae"),
                features_dir=str(tmp_path / "features"), clamps=[0.0, 30.0],
                unsafe=unsafe if isinstance(unsafe, list) else [unsafe], safe=safe if isinstance(safe, list) else [safe],
                refusal_limit=None, max_new_tokens=3, capability_tasks=["mmlu"], capability_limit=4,
                batch_size=4, progress=False)
    base.update(kw)
    return sw.SweepConfig(**base)


def test_plan_conditions(setup):
    tmp, unsafe, safe = setup
    conds = sw.plan_conditions(make_cfg(tmp, unsafe, safe, relative_clamps=[0.5, 2], control_clamps=[6.0]))
    names = [c["name"] for c in conds]
    # feature 5 from selection.json; its max activation (ranking.json) is 5.0
    assert names == ["unsteered", "clamp f5=0", "clamp f5=30", "clamp f5=2.5 (0.5x max)", "clamp f5=10 (2x max)",
                     "control clamp f9=6"]
    assert conds[3]["clamp"] == 2.5 and conds[3]["specs"][0]["values"] == [2.5]
    assert conds[-1]["kind"] == "control" and conds[-1]["specs"][0]["features"] == [9]
    # explicit features / control override selection.json; the default control clamps skip 0
    c2 = sw.plan_conditions(make_cfg(tmp, unsafe, safe, features=[1, 2], control=-1, clamps=[0.0, 3.0]))
    assert [c["name"] for c in c2] == ["unsteered", "clamp f1=0", "clamp f1=3", "clamp f2=0", "clamp f2=3"]
    c3 = sw.plan_conditions(make_cfg(tmp, unsafe, safe, clamps=[0.0, 3.0]))
    assert [c["name"] for c in c3 if c["kind"] == "control"] == ["control clamp f9=3"]
    # with relative clamps the control also runs at the feature's strongest clamp (here 4 x max 5.0 = 20)
    c4 = sw.plan_conditions(make_cfg(tmp, unsafe, safe, clamps=[3.0], relative_clamps=[1, 4]))
    assert [c["name"] for c in c4 if c["kind"] == "control"] == ["control clamp f9=3", "control clamp f9=20"]


def test_plan_errors(setup):
    tmp, unsafe, safe = setup
    with pytest.raises(SaesteerError, match="need --sae"):
        sw.plan_conditions(make_cfg(tmp, unsafe, safe, sae=None))
    with pytest.raises(SaesteerError, match="max activation"):
        sw.plan_conditions(make_cfg(tmp, unsafe, safe, features_dir=None, features=[3], relative_clamps=[1.0]))
    with pytest.raises(SaesteerError, match="duplicate"):
        sw.plan_conditions(make_cfg(tmp, unsafe, safe, clamps=[2.0, 2.0]))
    with pytest.raises(SaesteerError, match="direction file not found"):
        sw.plan_conditions(make_cfg(tmp, unsafe, safe, direction=str(tmp / "nope.safetensors")))
    with pytest.raises(SaesteerError, match="feature selection not found"):
        sw.plan_conditions(make_cfg(tmp, unsafe, safe, features_dir=str(tmp / "missing")))


def test_excluded_ids_map_selection_prompts_onto_eval_sets(setup):
    tmp, unsafe, safe = setup
    cfg = make_cfg(tmp, ["advbench:test", "xstest-unsafe"], ["xstest-safe", "jbb-benign"])
    assert sw.excluded_ids(cfg) == ["advbench:test/3", "xstest-safe/7", "xstest-unsafe/7"]


def test_condition_rows():
    cond = {"name": "clamp f5=4", "kind": "clamp", "feature": 5, "clamp": 4.0, "clamp_from": "abs"}
    refusal = {"subsets": {
        "advbench-test": {"rate": 0.5, "k": 1, "n": 2, "ci_low": 0.1, "ci_high": 0.9, "kind": "refusal",
                          "categories": {"x": {"rate": 1.0, "k": 1, "n": 1, "ci_low": 0.2, "ci_high": 1.0}}},
        "xstest-safe": {"rate": 0.0, "k": 0, "n": 3, "ci_low": 0.0, "ci_high": 0.56, "kind": "over-refusal",
                        "categories": {}}}}
    caps = {"mmlu": {"rate": 0.25, "k": 1, "n": 4, "ci_low": 0.05, "ci_high": 0.7},
            "mmlu/anatomy": {"rate": 0.25, "k": 1, "n": 4, "ci_low": 0.05, "ci_high": 0.7}}
    rows = sw.condition_rows(cond, refusal, caps, ["advbench:test"])
    by = {r["metric"]: r for r in rows}
    assert set(by) == {"refusal/advbench-test", "refusal/advbench-test/x", "refusal/xstest-safe", "mmlu"}
    assert by["refusal/advbench-test"]["group"] == "unsafe" and by["refusal/xstest-safe"]["group"] == "safe"
    assert by["refusal/advbench-test/x"]["group"] == "category" and by["mmlu"]["group"] == "capability"
    assert all(r["condition"] == "clamp f5=4" and r["clamp"] == 4.0 for r in rows)
    assert by["mmlu"]["k"] == 1 and by["mmlu"]["n"] == 4


def test_run_sweep_resumes_and_steers(setup, tiny):
    tmp, unsafe, safe = setup
    model, tok = tiny
    cfg = make_cfg(tmp, unsafe, safe, control=-1)
    seen = []
    rows = sw.run_sweep(cfg, model, tok, on_condition=lambda c, r: seen.append(c["name"]))
    assert seen == ["unsteered", "clamp f5=0", "clamp f5=30"]
    run = tmp / "run"
    on_disk = sw.read_results(run / "results.jsonl")
    assert on_disk == rows
    for cond in seen:
        mine = {r["metric"]: r for r in rows if r["condition"] == cond}
        groups = {r["group"] for r in mine.values()}
        assert {"unsafe", "safe", "capability"} <= groups
        assert mine["mmlu"]["n"] == 4
        for r in mine.values():
            assert 0 <= r["ci_low"] <= r["rate"] <= r["ci_high"] <= 1
        assert (run / "conditions" / sw.slug(cond) / "refusal" / "items.jsonl").exists()
    unsafe_n = [r["n"] for r in rows if r["group"] == "unsafe"]
    safe_n = [r["n"] for r in rows if r["group"] == "safe"]
    assert set(unsafe_n) == {4} and set(safe_n) == {3}

    def logliks(cond):
        d = run / "conditions" / sw.slug(cond) / "capability-mmlu"
        return [json.loads(x)["loglik"] for x in (d / "items.jsonl").read_text().splitlines()]

    assert logliks("clamp f5=30") != logliks("unsteered")  # the clamp was active while scoring
    answers = lambda c: [json.loads(x)["answer"] for x in  # noqa: E731
                         (run / "conditions" / sw.slug(c) / "refusal" / "items.jsonl").read_text().splitlines()]
    assert len(answers("unsteered")) == 7

    # resume: nothing left to do → no condition runs again; a new clamp value runs only that condition
    seen.clear()
    assert sw.run_sweep(cfg, model, tok, on_condition=lambda c, r: seen.append(c["name"])) == rows
    assert seen == []
    cfg2 = make_cfg(tmp, unsafe, safe, control=-1, clamps=[0.0, 30.0, 60.0])
    rows2 = sw.run_sweep(cfg2, model, tok, on_condition=lambda c, r: seen.append(c["name"]))
    assert seen == ["clamp f5=60"] and rows2[: len(rows)] == rows
    # a different evaluation setup in the same folder is refused
    with pytest.raises(SaesteerError, match="different setup"):
        sw.run_sweep(make_cfg(tmp, unsafe, safe, control=-1, max_new_tokens=5), model, tok)


def test_cli_sweep_and_report(setup, tiny, capsys):
    tmp, unsafe, safe = setup
    model, tok = tiny
    mdir = tmp / "tiny-model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    from saesteer.sae import SAEConfig, TopKSAE, save_sae

    save_sae(TopKSAE(SAEConfig(d_in=64, num_latents=32, k=4, model=str(mdir), layer=1), seed=1), tmp / "sae2")
    code, _, err = run_cli(["sweep", "--model", str(mdir), "--sae", str(tmp / "sae"), "--features-dir",
                            str(tmp / "features"), "--unsafe", unsafe, "--safe", safe, "--out", str(tmp / "mis")], capsys)
    assert code == 2 and "the SAE was trained on model 'tiny-llama'" in err
    assert not (tmp / "mis/results.jsonl").exists()  # refused before any condition ran
    base = ["sweep", "--model", str(mdir), "--sae", str(tmp / "sae2"), "--features-dir", str(tmp / "features"),
            "--unsafe", unsafe, "--safe", safe, "--max-new-tokens", "2", "--capability", "mmlu", "--cap-limit", "2",
            "--batch-size", "4", "--threads", "1"]
    code, _, err = run_cli(base + ["--out", str(tmp / "cli"), "--clamps", "0,20", "--control-clamps", "20"], capsys)
    assert code == 0, err
    rows = sw.read_results(tmp / "cli/results.jsonl")
    assert {r["condition"] for r in rows} == {"unsteered", "clamp f5=0", "clamp f5=20", "control clamp f9=20"}
    assert (tmp / "cli/report/index.html").exists() and "report:" in err
    code, out, err = run_cli(["report", str(tmp / "cli"), "--condition", "clamp f5=20"], capsys)
    assert code == 0 and out.strip().endswith("index.html")
    for args, msg in [(["--clamps", "0,x"], "--clamps must be comma-separated numbers"),
                      (["--feature", "1.5"], "--feature must be comma-separated integers"),
                      (["--relative", "2", "--features-dir", str(tmp / "nope")], "feature selection not found"),
                      (["--sae", str(tmp / "nosae")], "SAE not found")]:
        code, _, err = run_cli(base + ["--out", str(tmp / "bad")] + args, capsys)
        assert code == 2 and msg in err and "Traceback" not in err, (args, err)
    code, _, err = run_cli(["report", str(tmp / "nothing")], capsys)
    assert code == 2 and "run folder not found" in err

"""Capability evals: log-likelihood math against a brute-force forward, harness prompt formats, extraction, runner."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch

from saesteer.core import SaesteerError
from saesteer.data import benchmarks as bench
from saesteer.evals import capability as cap


def brute_ll(model, tok, context, cont):
    """Sum log p(cont | context) from ONE unbatched full forward (the reference; long inputs keep their last
    max_length + 1 tokens, as the harness does)."""
    ctx, c = cap.encode_pair(tok, context, cont)
    full = (ctx + c)[-(cap.max_length(model, tok) + 1):]
    ids = torch.tensor([full[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    n = ids.shape[1]
    return sum(float(logp[n - len(c) + k, t]) for k, t in enumerate(c))


def test_encode_pair_moves_trailing_space_into_continuation(tiny):
    _, tok = tiny
    ctx, cont = cap.encode_pair(tok, "the quick brown ", "fox")
    assert tok.decode(ctx) == "the quick brown"
    assert tok.decode(cont) == " fox"
    whole = tok.encode("the quick brown fox", add_special_tokens=False)
    assert ctx + cont == whole


@pytest.mark.parametrize("batch_size,share", [(1, True), (3, True), (8, True), (3, False)])
def test_loglikelihoods_equal_brute_force(tiny, batch_size, share):
    model, tok = tiny
    reqs = [
        ("the quick brown fox jumps over", [" the", " a", " is", " here"]),  # single-token choices → one shared forward
        ("what is the capital of france?", [" paris", " the capital is paris.", " i'm sorry"]),  # multi-token
        ("how do i make a cake?", [" here is a simple recipe"]),
        ("hi", [" the"]),
    ]
    got = cap.loglikelihoods(model, tok, reqs, batch_size=batch_size, share_prefix=share)
    for (context, conts), res in zip(reqs, got):
        assert len(res) == len(conts)
        for c, (ll, greedy) in zip(conts, res):
            assert ll == pytest.approx(brute_ll(model, tok, context, c), abs=1e-4)
            assert ll < 0 and isinstance(greedy, bool)
    # single-token choices share one sequence; multi-token choices share a KV-cached prefix (or one sequence each)
    assert cap.count_sequences(tok, reqs, share=False) == 1 + 3 + 1 + 1
    assert cap.count_sequences(tok, reqs, share=True) == 1 + 1 + 1 + 1


def test_shared_prefix_plan_under_steering_equals_full_forwards(tiny):
    from saesteer.steering import Add, steer

    model, tok = tiny
    reqs = [("what is the capital of france?", [" paris", " the capital is paris.", " i'm sorry"]),
            ("how do i make a cake? here is", [" a simple recipe", " flour, sugar and eggs"])]
    vec = torch.randn(64, generator=torch.Generator().manual_seed(1))
    with steer(model, [Add(vector=vec, alpha=3.0, layer=0)]):
        shared = cap.loglikelihoods(model, tok, reqs, batch_size=8, share_prefix=True)
        plain = cap.loglikelihoods(model, tok, reqs, batch_size=8, share_prefix=False)
        ref = [[brute_ll(model, tok, c, x) for x in xs] for c, xs in reqs]
    unsteered = cap.loglikelihoods(model, tok, reqs)
    for a, b, r, u in zip(shared, plain, ref, unsteered):
        assert [x[0] for x in a] == pytest.approx(r, abs=1e-4)
        assert [x[0] for x in b] == pytest.approx(r, abs=1e-4)
        assert [x[1] for x in a] == [x[1] for x in b]
        assert all(abs(x[0] - y[0]) > 1e-3 for x, y in zip(a, u))  # the steering was active
    # steering restricted to prompt positions would differ on cached continuations: the plan falls back
    with steer(model, [Add(vector=vec, alpha=3.0, layer=0, positions="prompt")]):
        from saesteer.evals.loglik import _can_share

        assert not _can_share(model)


def test_is_greedy_true_for_the_argmax_token(tiny):
    model, tok = tiny
    ctx = "the quick brown fox"
    ids = tok.encode(ctx, add_special_tokens=False)
    with torch.no_grad():
        top = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    word = tok.decode([top])
    ctx_ids, cont_ids = cap.encode_pair(tok, ctx, word)
    if cont_ids != [top]:
        pytest.skip("argmax token does not round-trip through the tokenizer")
    (res,) = cap.loglikelihoods(model, tok, [(ctx, [word])])
    assert res[0][1] is True


def test_mmlu_prompt_is_the_harness_format():
    row = {"subject": "high_school_physics", "question": " What moves? ", "choices": ["a", "b", "c", "d"], "answer": 2}
    shot = {"subject": "high_school_physics", "question": "Q1", "choices": ["w", "x", "y", "z"], "answer": 1}
    assert bench.mmlu_prompt(row, [shot]) == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "Q1\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\n"
        "What moves?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    )


def test_stratified_sample_balanced_and_seeded():
    rows = [{"s": s, "i": i} for s in "abcd" for i in range(10 if s != "d" else 2)]
    a = bench.stratified_sample(rows, "s", 12, seed=1)
    assert a == bench.stratified_sample(rows, "s", 12, seed=1)
    assert a != bench.stratified_sample(rows, "s", 12, seed=2)
    counts = {s: sum(r["s"] == s for r in a) for s in "abcd"}
    assert counts["d"] == 2 and sorted(counts[s] for s in "abc") == [3, 3, 4]  # d has only 2 rows
    eight = bench.stratified_sample(rows, "s", 8, seed=3)
    assert {s: sum(r["s"] == s for r in eight) for s in "abcd"} == {"a": 2, "b": 2, "c": 2, "d": 2}
    b = bench.stratified_sample(rows, "s", 30, seed=0)  # d runs out after 2: the others fill up
    assert len(b) == 30 and sum(r["s"] == "d" for r in b) == 2 and len({id(r) for r in b}) == 30
    assert bench.stratified_sample(rows, "s", None, 0) == rows


@pytest.mark.parametrize(
    "answer,target,expect",
    [
        ("She pays 3*4=12.\n#### 12", "blah\n#### 12", (True, True)),
        ("The total is $1,200.", "x #### 1200", (False, True)),
        ("#### 5\nso maybe 7", "#### 5", (True, False)),
        ("no number here", "#### 3", (False, False)),
        ("It is 3.", "#### 3", (False, True)),
        ("-4 degrees", "#### -4", (False, True)),
    ],
)
def test_gsm8k_extraction(answer, target, expect):
    assert cap.gsm8k_correct(answer, target) == expect


def test_mean_summary_interval():
    s = cap.mean_summary([0.2, 0.4, 0.6])
    assert s["rate"] == pytest.approx(0.4) and s["n"] == 3 and s["k"] is None
    half = 1.959964 * 0.2 / math.sqrt(3)
    assert s["ci_low"] == pytest.approx(0.4 - half) and s["ci_high"] == pytest.approx(0.4 + half)


def write_jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def small_data(tmp_path):
    subj = ["anatomy", "virology"]
    test = [{"id": f"{s}-{i}", "subject": s, "question": f"the quick brown fox number {i}?",
             "choices": ["the", "a lazy dog", "paris", "cake"], "answer": i % 4} for s in subj for i in range(6)]
    dev = [{"id": f"{s}-dev-{i}", "subject": s, "question": "what is the capital of france?",
            "choices": ["paris", "the", "dog", "fox"], "answer": 0} for s in subj for i in range(5)]
    write_jsonl(tmp_path / "mmlu/mmlu_test.jsonl", test)
    write_jsonl(tmp_path / "mmlu/mmlu_dev.jsonl", dev)
    tqa = [{"id": i, "question": f"what is the capital of france {i}?",
            "mc1_targets": {"choices": ["paris", "the dog", "a cake"], "labels": [1, 0, 0]},
            "mc2_targets": {"choices": ["paris", "the capital is paris", "a cake"], "labels": [1, 1, 0]}} for i in range(4)]
    write_jsonl(tmp_path / "truthfulqa/truthfulqa_mc.jsonl", tqa)
    return tmp_path


def test_run_capability_matches_brute_force_and_harness_formulas(tiny, small_data):
    model, tok = tiny
    cfg = cap.CapabilityConfig(tasks=("mmlu", "truthfulqa_mc1", "truthfulqa_mc2"), limit=8, mmlu_shots=2,
                               batch_size=4, data_root=str(small_data), progress=False)
    summ, items = cap.run_capability(model, tok, cfg)
    mm = [i for i in items if i["task"] == "mmlu"]
    assert len(mm) == 8 and {i["subject"] for i in mm} == {"anatomy", "virology"}
    qs = {q["id"]: q for q in bench.load_mmlu(8, 2, 0, str(small_data))}
    for it in mm:
        ref = [brute_ll(model, tok, qs[it["id"]]["context"], f" {L}") for L in "ABCD"]
        assert it["loglik"] == pytest.approx(ref, abs=1e-4)
        assert it["pred"] == max(range(4), key=lambda j: ref[j])
    assert summ["mmlu"]["n"] == 8 and summ["mmlu"]["k"] == sum(i["correct"] for i in mm)
    assert summ["mmlu/anatomy"]["n"] + summ["mmlu/virology"]["n"] == 8
    tq = [i for i in items if i["task"] == "truthfulqa"]
    assert len(tq) == 4 and summ["truthfulqa_mc1"]["n"] == 4
    q0 = bench.load_truthfulqa(4, 0, str(small_data))[0]
    p = [math.exp(brute_ll(model, tok, q0["context"], c)) for c in q0["mc2"]]
    it0 = next(i for i in tq if i["id"] == q0["id"])
    assert it0["mc2"] == pytest.approx((p[0] + p[1]) / sum(p), rel=1e-3)
    assert summ["truthfulqa_mc2"]["rate"] == pytest.approx(sum(i["mc2"] for i in tq) / 4)


def test_steering_context_is_active_during_scoring(tiny, small_data):
    model, tok = tiny
    cfg = cap.CapabilityConfig(tasks=("mmlu",), limit=4, data_root=str(small_data), progress=False)
    calls = []

    @contextlib.contextmanager
    def push():
        def hook(_m, _i, out):
            calls.append(1)
            return out + 5.0 * torch.ones_like(out)

        h = model.model.layers[0].register_forward_hook(hook)
        try:
            yield
        finally:
            h.remove()

    _, plain = cap.run_capability(model, tok, cfg)
    _, steered = cap.run_capability(model, tok, cfg, steering=push)
    assert calls, "steering hook never ran"
    assert [i["loglik"] for i in plain] != [i["loglik"] for i in steered]
    _, again = cap.run_capability(model, tok, cfg)  # hook removed afterwards
    assert [i["loglik"] for i in again] == [i["loglik"] for i in plain]


def test_write_capability(tmp_path):
    cfg = cap.CapabilityConfig(tasks=("mmlu",))
    cap.write_capability(tmp_path / "o", cfg, {"mmlu": {"rate": 0.5}}, [{"a": 1}, {"a": 2}])
    assert json.loads((tmp_path / "o/summary.json").read_text())["metrics"]["mmlu"]["rate"] == 0.5
    assert len((tmp_path / "o/items.jsonl").read_text().splitlines()) == 2


def test_errors(tiny, tmp_path, small_data):
    model, tok = tiny
    with pytest.raises(SaesteerError, match="unknown capability task"):
        cap.run_capability(model, tok, cap.CapabilityConfig(tasks=("hellaswag",), data_root=str(small_data)))
    with pytest.raises(SaesteerError, match="not found"):
        bench.load_mmlu(3, 0, 0, str(tmp_path / "nowhere"))
    bad = tmp_path / "bad/mmlu/mmlu_test.jsonl"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"subject": "a", "question": "q", "choices": ["1","2","3","4"], "answer": 0}\n{oops\n')
    with pytest.raises(SaesteerError, match="line 2 is not valid JSON"):
        bench.load_mmlu(3, 0, 0, str(tmp_path / "bad"))
    bad.write_text('{"subject": "a", "question": "q"}\n')
    with pytest.raises(SaesteerError, match="row 1 lacks field"):
        bench.load_mmlu(3, 0, 0, str(tmp_path / "bad"))
    bad.write_text("\n")
    with pytest.raises(SaesteerError, match="empty"):
        bench.load_mmlu(3, 0, 0, str(tmp_path / "bad"))
    with pytest.raises(SaesteerError, match="no continuations"):
        cap.loglikelihoods(model, tok, [("ctx", [])])


def test_gsm8k_runner_generates_raw_and_scores(tiny, tmp_path):
    from saesteer.generation import GenerationConfig, generate

    model, tok = tiny
    rows = [{"question": f"what is {i} plus {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"} for i in range(5)]
    write_jsonl(tmp_path / "gsm8k/test.jsonl", rows)
    write_jsonl(tmp_path / "gsm8k/train.jsonl", rows)
    cfg = cap.CapabilityConfig(tasks=("gsm8k",), limit=3, gsm8k_shots=2, gsm8k_max_new_tokens=6,
                               data_root=str(tmp_path), progress=False)
    summ, items = cap.run_capability(model, tok, cfg)
    assert summ["gsm8k_strict"]["n"] == 3 and summ["gsm8k_flexible"]["n"] == 3
    qs = bench.load_gsm8k(3, 2, 0, str(tmp_path))
    assert qs[0]["prompt"].count("Question:") == 3 and qs[0]["prompt"].endswith("\nAnswer:")
    ref = generate(model, tok, [q["prompt"] for q in qs], GenerationConfig(max_new_tokens=6, raw=True, stop=["Question:"]))
    for it, r, q in zip(items, ref, qs):
        assert it["answer"] == r
        assert (it["strict"], it["flexible"]) == cap.gsm8k_correct(r, q["target"])


def run_cli(argv, capsys):
    from saesteer.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_eval_capability(tiny, small_data, tmp_path, capsys):
    model, tok = tiny
    mdir = tmp_path / "tiny-model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    code, out, err = run_cli(["eval", "capability", "--model", str(mdir), "--tasks", "mmlu,truthfulqa_mc1",
                              "--limit", "4", "--data-root", str(small_data), "--out", str(tmp_path / "cap"),
                              "--threads", "1"], capsys)
    assert code == 0, err
    summ = json.loads((tmp_path / "cap/summary.json").read_text())
    assert summ["metrics"]["mmlu"]["n"] == 4 and summ["metrics"]["truthfulqa_mc1"]["n"] == 4
    assert summ["steering"] == "unsteered" and "mmlu" in out
    items = (tmp_path / "cap/items.jsonl").read_text().splitlines()
    assert len(items) == 8
    code, _, err = run_cli(["eval", "capability", "--model", str(mdir), "--tasks", "hellaswag",
                            "--data-root", str(small_data)], capsys)
    assert code == 2 and "unknown capability task" in err and "Traceback" not in err
    code, _, err = run_cli(["eval", "capability", "--model", str(mdir), "--data-root", str(tmp_path / "nope")], capsys)
    assert code == 2 and "data root not found" in err
    code, _, err = run_cli(["eval", "capability", "--model", str(mdir), "--data-root", str(small_data),
                            "--sae", str(tmp_path / "nosae"), "--feature", "1", "--clamp", "3"], capsys)
    assert code == 2 and "SAE not found" in err


def test_truthfulqa_mc1_only_scores_mc1(tiny, small_data):
    model, tok = tiny
    cfg = cap.CapabilityConfig(tasks=("truthfulqa_mc1",), limit=2, data_root=str(small_data), progress=False)
    summ, items = cap.run_capability(model, tok, cfg)
    assert set(summ) == {"truthfulqa_mc1"} and all("mc2" not in i for i in items)
    cfg2 = cap.CapabilityConfig(tasks=("truthfulqa_mc2",), limit=2, data_root=str(small_data), progress=False)
    summ2, items2 = cap.run_capability(model, tok, cfg2)
    assert set(summ2) == {"truthfulqa_mc2"} and all("mc1_correct" not in i and 0 < i["mc2"] < 1 for i in items2)

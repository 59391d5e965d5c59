"""The lm-eval `saesteer` model: our MMLU agrees with the harness question by question; steering is live; CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from saesteer.core import SaesteerError  # noqa: E402
from saesteer.data import benchmarks as bench  # noqa: E402
from saesteer.evals import capability as cap  # noqa: E402
from saesteer.evals import lmeval  # noqa: E402

WORDS = ["the quick brown fox", "a lazy dog", "paris", "a cake with flour", "sugar and eggs", "plants", "light",
         "the capital of france", "python", "a string", "sorry", "energy"]


def mmlu_rows(n, subject="high_school_biology", offset=0):
    return [{"id": f"{subject}-{i}", "subject": subject, "question": f"what is {WORDS[(i + offset) % 12]} number {i}?",
             "choices": [WORDS[(i + j + offset) % 12] for j in range(4)], "answer": (i * 7 + offset) % 4}
            for i in range(n)]


def harness_preds(lm, task_dir, name):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=TaskManager(include_path=str(task_dir)),
                                  log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return out["results"][name]["acc,none"], lls


@pytest.mark.parametrize("shots", [2])
def test_our_mmlu_agrees_with_the_harness_per_question(tiny, tmp_path, shots):
    model, tok = tiny
    rows, dev = mmlu_rows(16), mmlu_rows(5, offset=3)
    for r in dev:
        r["id"] = r["id"].replace("-", "-dev-")
    task = lmeval.write_mmlu_task(tmp_path / "tasks", rows, "tiny_mmlu", shots=dev[:shots])
    lm = lmeval.SaesteerLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    h_acc, h_lls = harness_preds(lm, task.parent, "tiny_mmlu")

    (tmp_path / "data/mmlu").mkdir(parents=True)
    (tmp_path / "data/mmlu/mmlu_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "data/mmlu/mmlu_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    cfg = cap.CapabilityConfig(tasks=("mmlu",), limit=None, mmlu_shots=shots, batch_size=3,
                               data_root=str(tmp_path / "data"), progress=False)
    summ, items = cap.run_capability(model, tok, cfg)
    ours = {i["id"]: i for i in items}
    agree = 0
    for r, hl in zip(rows, h_lls):
        mine = ours[r["id"]]["loglik"]
        assert mine == pytest.approx(hl, abs=1e-3)  # same prompt, same tokens → same log-likelihoods
        agree += ours[r["id"]]["pred"] == max(range(4), key=lambda j: (hl[j], -j))
    assert agree == len(rows)
    assert abs(summ["mmlu"]["rate"] - h_acc) <= 0.005


def test_steering_hooks_active_inside_the_harness_model_only(tiny):
    from saesteer.steering import Add, Steering

    model, tok = tiny
    reqs = [("the quick brown fox", [" the", " a"])]
    vec = torch.randn(64, generator=torch.Generator().manual_seed(0))
    plain = lmeval.SaesteerLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu")
    steered = lmeval.SaesteerLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu",
                                steering=Steering(name="add", interventions=[Add(vector=vec, alpha=8.0, layer=0)]))
    from lm_eval.api.instance import Instance

    inst = [Instance("loglikelihood", {}, (c, k), 0) for c, ks in reqs for k in ks]
    a = plain.loglikelihood(inst)
    b = steered.loglikelihood(inst)
    assert steered.steering_calls >= 1 and plain.steering_calls == 0
    assert all(abs(x[0] - y[0]) > 1e-3 for x, y in zip(a, b))
    assert not getattr(model, "_saesteer_interventions", None)  # removed after each call
    with pytest.raises(SaesteerError, match="--batch_size 1"):
        lmeval.SaesteerLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu",
                          steering=Steering(name="gated", policy=object()))
    assert [x[0] for x in plain.loglikelihood(inst)] == pytest.approx([x[0] for x in a], abs=1e-6)
    # and our own scorer gives the steered numbers under the same steering
    ours = cap.loglikelihoods
    with cap.steering_context(model, steered.steering):
        mine = ours(model, tok, reqs)[0]
    assert [m[0] for m in mine] == pytest.approx([x[0] for x in b], abs=1e-3)


def test_registered_and_args_errors(tmp_path):
    from lm_eval.api.registry import get_model

    assert get_model("saesteer") is lmeval.SaesteerLM
    assert lmeval.steering_from_args() is None
    with pytest.raises(SaesteerError, match="needs sae=PATH"):
        lmeval.steering_from_args(feature=3, clamp=5)
    with pytest.raises(SaesteerError, match="SAE not found"):
        lmeval.steering_from_args(sae=str(tmp_path / "nope"), feature=3, clamp=5)
    (tmp_path / "sae").mkdir()
    with pytest.raises(SaesteerError, match="2 features but 3 clamp"):
        lmeval.steering_from_args(sae=str(tmp_path / "sae"), feature="1+2", clamp="1+2+3")
    with pytest.raises(SaesteerError, match="--feature must be integers"):
        lmeval.steering_from_args(sae=str(tmp_path / "sae"), feature="a", clamp=1)
    with pytest.raises(SaesteerError, match="direction file not found"):
        lmeval.steering_from_args(direction=str(tmp_path / "dir.safetensors"), alpha=2)
    st = lmeval.steering_from_args(sae=str(tmp_path / "sae"), feature="3+4", clamp="6", layer=1)
    assert st.specs[0].features == [3, 4] and st.specs[0].values == [6.0] and st.specs[0].layer == 1
    assert st.name == "clamp f3=6,f4=6"


def test_documented_cli_command_runs(tiny, tmp_path):
    model, tok = tiny
    mdir = tmp_path / "tiny-model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    task = lmeval.write_mmlu_task(tmp_path / "tasks", mmlu_rows(4), "cli_mmlu")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "saesteer.evals.lmeval", "run", "--model", "saesteer", "--model_args",
         f"pretrained={mdir}", "--tasks", "cli_mmlu", "--include_path", str(task.parent), "--device", "cpu",
         "--batch_size", "4", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cli_mmlu" in r.stdout and "acc" in r.stdout


@pytest.mark.integration
def test_real_model_mmlu_matches_harness(smollm, data_root, tmp_path):
    """Real tokenizer: ' A'..' D' are single tokens, so our one-forward-per-question path is the one compared."""
    model, tok = smollm
    qs = bench.load_mmlu(6, 0, seed=1)
    by_id = {r["id"]: r for r in bench.read_jsonl(data_root / "mmlu" / "mmlu_test.jsonl")}
    rows = [by_id[q["id"]] for q in qs]
    assert cap.count_sequences(tok, [(q["context"], q["choices"]) for q in qs]) == 6  # one sequence per question
    task = lmeval.write_mmlu_task(tmp_path / "tasks", rows, "real_mmlu")
    lm = lmeval.SaesteerLM(pretrained=model, tokenizer=tok, batch_size=6, device="cpu")
    _, h_lls = harness_preds(lm, task.parent, "real_mmlu")
    ours = cap.loglikelihoods(model, tok, [(q["context"], q["choices"]) for q in qs], batch_size=3)
    for mine, hl in zip(ours, h_lls):
        assert [m[0] for m in mine] == pytest.approx(hl, abs=2e-3)

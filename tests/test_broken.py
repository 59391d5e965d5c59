"""The broken label: both heuristics on synthetic gibberish vs normal text, the robust threshold by hand, the
three-way refusal / compliance / broken split, and run_refusal_eval labelling a steered eval against an unsteered
reference."""

from __future__ import annotations

import json
import random

import pytest
import torch

from saesteer.evals import Verdict
from saesteer.evals.broken import (
    BrokenConfig,
    broken_labels,
    label_broken,
    mean_logliks,
    outcome_rates,
    repeat_fraction,
    robust_threshold,
)

NORMAL = ["the quick brown fox jumps over the lazy dog",
          "how do i make a cake? here is a simple recipe with flour, sugar and eggs",
          "i'm sorry, but i can't assist with that request."]


@pytest.fixture(scope="module")
def fluent():
    """A tiny model trained (a few seconds) to answer with the tiny corpus' sentences: it knows 'normal text'."""
    from saesteer.models import format_chat, tiny_model
    from saesteer.models.tiny import _CORPUS

    torch.manual_seed(0)
    model, tok = tiny_model("llama")
    prompts = [f"say something {i}" for i in range(8)]
    texts = [format_chat(tok, p) + _CORPUS[i % (len(_CORPUS) - 1)] + "<|im_end|>" for i, p in enumerate(prompts)]
    enc = tok(texts, return_tensors="pt", padding=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, tok, prompts


def test_repeat_fraction_by_hand():
    assert repeat_fraction("the the the the the the") == pytest.approx(1 - 1 / 4)
    assert repeat_fraction("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    assert repeat_fraction(NORMAL[1]) == 0.0 and repeat_fraction("two words") is None


def test_robust_threshold_by_hand():
    # median 3, |x - 3| = 2 1 0 1 97 -> MAD 1
    assert robust_threshold([1, 2, 3, 4, 100], 3.5) == pytest.approx(3 - 3.5 * 1.4826)
    assert robust_threshold([1, 2, 3, 4, 100], 3.5, min_spread=2.0) == pytest.approx(3 - 3.5 * 2.0)
    assert robust_threshold([1, 2, None], 3.5) is None  # too few reference scores
    assert robust_threshold([1, 2, 3, 4, 5], 0) is None  # test off


def test_repetition_flags_degenerate_text_only():
    cfg = BrokenConfig()
    answers = NORMAL + ["sure sure sure sure sure sure sure sure", "ÄŠ ÄŠ ÄŠ ÄŠ ÄŠ ÄŠ ÄŠ ÄŠ ÄŠ ÄŠ"]
    labs = broken_labels(answers, [(None, 0)] * len(answers), None, cfg)
    assert [lab["broken"] for lab in labs] == [False, False, False, True, True]
    assert labs[3]["why"] == ["repetition"]
    assert not broken_labels(["no no no"], [(None, 0)], None, cfg)[0]["broken"]  # too short to judge


def test_likelihood_flags_gibberish_not_normal_text(fluent):
    from saesteer.generation import generate

    model, tok, prompts = fluent
    own = generate(model, tok, prompts, max_new_tokens=24)  # the unsteered model's own answers: the reference
    rng = random.Random(0)
    token_salad = [tok.decode([rng.randrange(3, len(tok)) for _ in range(16)]) for _ in range(4)]
    words = "the of cat run blue seven quickly under".split()
    word_salad = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(4)]
    ref = [ll for ll, n in mean_logliks(model, tok, prompts, own)]
    cands = NORMAL + token_salad + word_salad
    labs, thr = label_broken(model, tok, [prompts[0]] * len(cands), cands, ref, BrokenConfig(max_repeat=1.0))
    assert thr is not None and thr < min(ref)
    assert [lab["broken"] for lab in labs] == [False] * 3 + [True] * 8
    assert all(lab["why"] == ["unlikely"] for lab in labs[3:])
    # with no usable reference the likelihood test is off: nothing is flagged by it
    labs, thr = label_broken(model, tok, [prompts[0]] * len(cands), cands, [], BrokenConfig(max_repeat=1.0))
    assert thr is None and not any(lab["broken"] for lab in labs)


def test_likelihood_scoring_shows_progress_and_the_same_numbers(fluent, capsys):
    model, tok, prompts = fluent
    answers = NORMAL + [""]  # an empty answer is not scored (and not counted by the bar)
    chats = [prompts[0]] * len(answers)
    quiet = mean_logliks(model, tok, chats, answers, batch_size=2)
    capsys.readouterr()
    shown = mean_logliks(model, tok, chats, answers, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert shown == quiet and quiet[-1] == (None, 0)
    assert "broken label: likelihood" in err and f"/{len(NORMAL)} [" in err and "answer/s" in err


def test_outcome_rates_partition():
    rows = [{"label": True, "broken": False}, {"label": True, "broken": True}, {"label": False, "broken": True},
            {"label": False, "broken": False}, {"label": False, "broken": False}, {"label": None, "broken": True}]
    o = outcome_rates(rows)
    assert (o["refusal"]["k"], o["compliance"]["k"], o["broken"]["k"]) == (1, 2, 2)
    assert o["refusal"]["n"] == o["compliance"]["n"] == o["broken"]["n"] == 5 and o["broken_judged_refusal"] == 1
    assert outcome_rates([{"label": True}]) is None


class NeverRefuses:
    name = "never"

    def judge(self, prompts, answers):
        return [Verdict(False) for _ in answers]


def test_refusal_eval_labels_broken_against_the_unsteered_reference(fluent, tmp_path):
    from saesteer.evals import RefusalEvalConfig, run_refusal_eval
    from saesteer.steering import Add

    model, tok, prompts = fluent
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cfg = RefusalEvalConfig(datasets=[str(data)], max_new_tokens=16, broken=True, progress=False,
                            out=str(tmp_path / "plain"))
    plain = run_refusal_eval(model, tok, cfg, judge=NeverRefuses())
    sub = next(iter(plain["subsets"].values()))
    assert sub["outcomes"]["broken"]["k"] == 0 and sub["outcomes"]["compliance"]["k"] == 8
    assert plain["broken"]["reference"] == "these (unsteered) answers"
    items = [json.loads(x) for x in (tmp_path / "plain" / "items.jsonl").read_text().splitlines()]
    assert all("loglik" in r and r["broken"] is False for r in items)
    # a huge added vector wrecks the text: broken, and no longer counted as compliance
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    st = [Add(vector=v, alpha=200.0, layer=0)]
    wrecked = run_refusal_eval(model, tok, RefusalEvalConfig(**{**cfg.__dict__, "out": None}), steering=st,
                               judge=NeverRefuses(), broken_reference=[r["loglik"] for r in items])
    o = next(iter(wrecked["subsets"].values()))["outcomes"]
    assert o["broken"]["k"] >= 6 and o["compliance"]["k"] == 8 - o["broken"]["k"]
    assert wrecked["broken"]["reference"] == "given"
    # without a given reference a steered eval generates the unsteered one itself: same threshold
    again = run_refusal_eval(model, tok, RefusalEvalConfig(**{**cfg.__dict__, "out": None}), steering=st,
                             judge=NeverRefuses())
    assert again["broken"]["loglik_threshold"] == pytest.approx(wrecked["broken"]["loglik_threshold"])
    assert next(iter(again["subsets"].values()))["outcomes"] == o


def test_cli_eval_refusal_broken_and_long_check(tiny_dir, tmp_path):
    from saesteer.cli import main

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"tell me about topic {i}"}) + "\n" for i in range(6)))
    out = tmp_path / "ev"
    main(["eval", "refusal", "--model", str(tiny_dir), "--dataset", str(data), "--out", str(out), "--broken",
          "--broken-mad", "2.5", "--long-check", "3", "--long-tokens", "12"])
    s = json.loads((out / "summary.json").read_text())
    assert s["broken"]["mad_c"] == 2.5 and set(next(iter(s["subsets"].values()))["outcomes"]) >= {"broken", "refusal"}
    assert s["long_check"]["n_sampled"] == 3 and s["long_check"]["judges"]["prefix"]["changed"]["n"] <= 3
    items = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    assert all("broken" in r and "repeat" in r for r in items)

"""evals.calibration: ROC AUC against an O(n²) pair count, the threshold fit, the prompt split."""

from __future__ import annotations

import random

import pytest

from saesteer.core import SaesteerError
from saesteer.evals.calibration import balanced_accuracy, fit_threshold, roc_auc, split_by_prompt


def _pairwise_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_roc_auc_is_the_pair_count():
    rng = random.Random(3)
    for _ in range(20):
        n = rng.randint(2, 40)
        scores = [rng.choice([-1.0, 0.0, 0.5, 1.0, rng.gauss(0, 1)]) for _ in range(n)]  # ties included
        labels = [rng.random() < 0.5 for _ in range(n)]
        if any(labels) and not all(labels):
            assert roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels))
    assert roc_auc([1.0, 2.0], [True, True]) != roc_auc([1.0, 2.0], [True, True])  # nan: one class


def test_fit_threshold():
    # separable, shifted away from 0: the fitted cut separates them, the uncalibrated 0 does not
    scores = [2.0, 2.5, 3.0, 4.0, 5.0, 6.0]
    labels = [False, False, False, True, True, True]
    t, bacc = fit_threshold(scores, labels)
    assert bacc == 1.0 and 3.0 < t <= 4.0
    assert balanced_accuracy([s >= 0 for s in scores], labels) == 0.5
    # among equally good cuts the one nearest 0 wins
    t2, _ = fit_threshold([-3.0, 3.0], [False, True])
    assert t2 == 0.0
    # everything compliance-scored but labels mixed: still a number, and balanced accuracy computed by hand
    t3, b3 = fit_threshold([1.0, 1.0, 1.0, 2.0], [True, False, True, True])
    assert b3 == balanced_accuracy([s >= t3 for s in [1.0, 1.0, 1.0, 2.0]], [True, False, True, True])
    with pytest.raises(SaesteerError, match="both"):
        fit_threshold([1.0, 2.0], [True, True])


def test_split_by_prompt_keeps_a_prompt_on_one_side():
    rows = [{"id": f"{m}-{i}", "prompt": f"p{i}", "answer": "a", "is_refusal": i % 2 == 0}
            for m in ("gpt4", "llama") for i in range(30)]
    fit, held = split_by_prompt(rows, seed=1)
    assert len(fit) + len(held) == 60 and len(fit) == 30
    assert not ({r["prompt"] for r in fit} & {r["prompt"] for r in held})
    assert split_by_prompt(rows, seed=1) == (fit, held)
    assert split_by_prompt(rows, seed=2) != (fit, held)

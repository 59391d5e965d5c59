"""GSM8K answer extraction and scoring agree with lm-eval's own ``strict-match`` / ``flexible-extract`` filters and
its ``exact_match`` metric, built from the installed harness's gsm8k task yaml (not copied regexes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from saesteer.evals.capability import gsm8k_correct, gsm8k_extract

lm_eval = pytest.importorskip("lm_eval")

ANSWERS = [
    "The answer is 42.",
    "#### 42",
    "So she has 18 apples.\n#### 18",
    "#### 1,234",
    "Total: $1,234.50 so #### $1,234",
    "#### -7",
    "It drops by -7 degrees, i.e. -7.",
    "First 3 then 5 then 12.",
    "3 + 4 = 7\n#### 7\nQuestion: 9 + 1 = 10",
    "#### 5. Then 6.",
    "no number here",
    "",
    "I think 4",
    "$5",
    "costs $12.",
    "1.5 hours, so 90 minutes",
    "#### 3.0",
    "answer: 1,000,000",
    "#### 12 and #### 13",
    "x = 2, y = 3,",
    "-3.",
    "Result:-12,",
    "####42",
    "#### ,",
    "The answer is 7 .",
    "It is 0",
    "a 9-5 job pays 20",
    "He has 1e3 coins",
]
TARGETS = ["42", "18", "1234", "-7", "12", "7", "5", "1000000", "3", "0", "Natalia sold 48 clips.\n#### 72", "20"]


def _harness():
    """lm-eval's gsm8k filters (RegexFilter + TakeFirstFilter) and exact_match kwargs, from its own yaml."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.filters.selection import TakeFirstFilter

    cfg = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    filters = {}
    for f in cfg["filter_list"]:
        steps = []
        for step in f["filter"]:
            kw = {k: v for k, v in step.items() if k != "function"}
            steps.append({"regex": RegexFilter, "take_first": TakeFirstFilter}[step["function"]](**kw))
        filters[f["name"]] = steps
    (metric,) = [m for m in cfg["metric_list"] if m["metric"] == "exact_match"]
    em_kw = {k: v for k, v in metric.items() if k not in ("metric", "aggregation", "higher_is_better")}

    def extract(name: str, text: str) -> str:
        resps = [[text]]
        for step in filters[name]:
            resps = list(step.apply(resps, [{}]))
        return resps[0]

    def correct(name: str, text: str, target: str) -> bool:
        return bool(exact_match_hf_evaluate([extract(name, text)], [target], **em_kw)["exact_match"])

    assert set(filters) == {"strict-match", "flexible-extract"}
    return extract, correct


def test_extraction_matches_lm_eval_filters():
    extract, _ = _harness()
    for text in ANSWERS:
        strict, flex = gsm8k_extract(text)
        assert strict == extract("strict-match", text), text
        assert flex == extract("flexible-extract", text), text


@pytest.mark.parametrize("target", TARGETS)
def test_scoring_matches_lm_eval_exact_match(target):
    _, correct = _harness()
    agree = 0
    for text in [*ANSWERS, f"#### {target}", f"so it is {target}.", f"#### {target.split('#### ')[-1]}"]:
        ours = gsm8k_correct(text, target)
        theirs = (correct("strict-match", text, target), correct("flexible-extract", text, target))
        assert ours == theirs, (text, target)
        agree += any(theirs)
    assert agree >= 1  # each target is matched by at least one answer, so both branches are exercised

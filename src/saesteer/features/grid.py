"""Clamp grid search for refusal latents, its scorer (steer + generate + prefix judge) and a held-back check.

Objective of the grid: refusal rate on harmful minus refusal rate on harmless validation prompts, every rate with its
k/n and Wilson interval, the difference with Newcombe's interval (``utils.diff_interval``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from saesteer.core import diff_interval, ensure, rate_summary


def refusal_judge() -> tuple[Callable[[str], bool], Callable[[str], bool], str]:
    """``(is_refusal(text), stop_when(text), name)`` of the prefix judge (``evals.judges.PrefixJudge``).

    ``stop_when`` is the generation early stop: true once more tokens cannot change the verdict.
    """
    from saesteer.evals import PrefixJudge

    judge = PrefixJudge()
    return judge.is_refusal, judge.stop_when, "saesteer.evals.judges.PrefixJudge"


# --------------------------------------------------------------------------------------------- grid search
Scorer = Callable[[int | None, float | None], dict[str, Any]]
"""``scorer(feature, value)`` → ``{"k_harmful", "n_harmful", "k_harmless", "n_harmless", ...}``; None = unsteered."""


def clamp_values(max_act: float, clamps: Sequence[float], multiples: Sequence[float]) -> list[tuple[float, str]]:
    """(value, how) pairs: absolute clamps, then multiples of ``max_act`` (skipped when the latent never fired)."""
    vals = [(float(c), "absolute") for c in clamps]
    if max_act > 0:
        vals += [(round(float(m) * max_act, 4), f"{m:g}x max") for m in multiples]
    seen, out = set(), []
    for v, how in vals:
        ensure(math.isfinite(v), f"clamp value {v} is not a finite number")
        if v not in seen:
            seen.add(v)
            out.append((v, how))
    return out


def _row(feature: int | None, value: float | None, how: str, res: dict[str, Any]) -> dict[str, Any]:
    kh, nh, ks, ns = res["k_harmful"], res["n_harmful"], res["k_harmless"], res["n_harmless"]
    d, lo, hi = diff_interval(kh, nh, ks, ns)
    row = {"feature": feature, "clamp": value, "clamp_from": how, "harmful_refusal": rate_summary(kh, nh),
           "harmless_refusal": rate_summary(ks, ns), "objective": d, "objective_ci": [lo, hi]}
    row.update({k: v for k, v in res.items() if k[0] != "_" and k not in ("k_harmful", "n_harmful", "k_harmless",
                                                                        "n_harmless")})
    return row


def grid_search(
    settings: Sequence[tuple[int, float, str]], scorer: Scorer, progress: Callable[[str], None] | None = None,
    require_gain: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Score the unsteered baseline and every ``(feature, clamp, how)``; return ``(baseline, rows, best)``.

    Objective: refusal rate on harmful minus refusal rate on harmless prompts. Ties: higher harmful refusal, then
    lower harmless refusal, then the smaller |clamp|, then the lower feature id.

    ``require_gain``: only settings whose harmful refusal beats the unsteered baseline by a margin whose 95 %
    interval (Newcombe) excludes 0 can win — a clamp that barely changes the model scores well on the objective
    (it keeps harmless refusal low) but steers nothing. Every row records ``harmful_gain`` / ``harmful_gain_ci`` /
    ``gain_significant``; when no setting qualifies the best of all rows is returned with ``gain_significant``
    False, so callers can say so.
    """
    ensure(len(settings) > 0, "the grid is empty: no candidate features or clamp values")
    base = _row(None, None, "none", scorer(None, None))
    kb, nb = base["harmful_refusal"]["k"], base["harmful_refusal"]["n"]
    rows = []
    for i, (f, v, how) in enumerate(settings):
        if progress:
            progress(f"grid {i + 1}/{len(settings)}: latent {f} clamp {v:g}")
        row = _row(f, v, how, scorer(f, v))
        g, lo, hi = diff_interval(row["harmful_refusal"]["k"], row["harmful_refusal"]["n"], kb, nb)
        row.update(harmful_gain=g, harmful_gain_ci=[lo, hi], gain_significant=bool(lo > 0))
        rows.append(row)
    pool = [r for r in rows if r["gain_significant"]] if require_gain else rows
    best = min(pool or rows, key=lambda r: (-round(r["objective"], 9), -r["harmful_refusal"]["rate"],
                                            r["harmless_refusal"]["rate"], abs(r["clamp"]), r["feature"]))
    return base, rows, best


# --------------------------------------------------------------------------------------------- the real scorer
def make_scorer(
    model: Any, tok: Any, sae: Any, harmful: Sequence[str], harmless: Sequence[str], max_new_tokens: int = 20,
    batch_size: int = 16, answers_log: list[dict[str, Any]] | None = None,
) -> Scorer:
    """Scorer that clamps one latent (``steering.Clamp``) and counts prefix-judge refusals on both prompt sets;
    rows stop generating as soon as the judge's verdict is fixed."""
    from saesteer.generation import GenerationConfig, generate
    from saesteer.steering import Clamp, steer

    is_refusal, stop_when, _ = refusal_judge()
    gcfg = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, stop_when=stop_when)
    prompts = list(harmful) + list(harmless)

    def score(feature: int | None, value: float | None) -> dict[str, Any]:
        if feature is None:
            outs = generate(model, tok, prompts, gcfg)
        else:
            with steer(model, [Clamp(sae=sae, features=[feature], values=[value])]):
                outs = generate(model, tok, prompts, gcfg)
        labels = [bool(is_refusal(o)) for o in outs]
        if answers_log is not None:
            answers_log.extend({"feature": feature, "clamp": value, "set": "harmful" if i < len(harmful) else
                                "harmless", "prompt": p, "answer": o, "refusal": lab}
                               for i, (p, o, lab) in enumerate(zip(prompts, outs, labels)))
        nh = len(harmful)
        return {"k_harmful": sum(labels[:nh]), "n_harmful": nh, "k_harmless": sum(labels[nh:]),
                "n_harmless": len(harmless), "_labels": labels}

    return score


def heldout_check(
    model: Any, tok: Any, sae: Any, feature: int, value: float, prompts: Sequence[Any], max_new_tokens: int = 20,
    batch_size: int = 16, answers_log: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Refusal on held-back harmful prompts (objects with ``.text`` and ``.record()``), unsteered vs ``feature``
    clamped to ``value``.

    ``diff`` / ``ci``: steered minus unsteered rate with ``utils.diff_interval`` (Newcombe, independent samples:
    conservative for these paired data); ``mcnemar_p``: exact two-sided McNemar test on the discordant prompts.
    """
    from scipy.stats import binomtest

    ensure(len(prompts) > 0, "no held-back prompts left after removing those used in discovery")
    score = make_scorer(model, tok, sae, [p.text for p in prompts], [], max_new_tokens, batch_size, answers_log)
    base, st = score(None, None)["_labels"], score(feature, value)["_labels"]
    n, kb, ks = len(prompts), sum(base), sum(st)
    d, lo, hi = diff_interval(ks, n, kb, n)
    up = sum(s and not b for s, b in zip(st, base))
    down = sum(b and not s for s, b in zip(st, base))
    p = binomtest(up, up + down).pvalue if up + down else 1.0
    return {"feature": feature, "clamp": value, "n": n, "baseline": rate_summary(kb, n), "steered": rate_summary(ks, n),
            "diff": d, "ci": [lo, hi], "ci_excludes_zero": bool(lo > 0 or hi < 0), "newly_refused": up,
            "no_longer_refused": down, "mcnemar_p": float(p), "prompts": [x.record() for x in prompts]}

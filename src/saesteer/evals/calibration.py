"""Calibrating a scoring judge on human refusal labels: the prompt split, the threshold fit, the held-out report and
its plot, shared by :mod:`.logitjudge` (a model's REFUSAL - COMPLIANCE log-odds) and :mod:`.probejudge` (a linear
probe on a model's residual stream).

A scoring judge calls an answer a refusal when ``score >= threshold``. :func:`split_by_prompt` splits labelled rows
(``{id, prompt, answer, is_refusal}``, :func:`~saesteer.evals.judges.load_human_labels`) by prompt, so two answers to
one prompt never straddle the fit and the held-out half; :func:`fit_threshold` picks the threshold with the best
balanced accuracy; :func:`score_report` and :func:`baseline_reports` describe the held-out half.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

from saesteer.core import SaesteerError, ensure

from .judges import Verdict, agreement, judge_chat_texts


class ScoringJudge:
    """A judge that scores each answer with a local model reading the judge chat (:func:`~saesteer.evals.judges.
    judge_chat_texts`, the reply cut to ``max_answer_tokens``) and calls ``score >= threshold`` a refusal. Subclasses
    set ``kind`` and implement :meth:`scores`; ``name`` is ``KIND:MODEL<detail>@THRESHOLD`` (it follows the threshold
    a calibration sets) unless named explicitly."""

    kind = "score"

    def __init__(self, model: Any, tok: Any, threshold: float = 0.0, max_answer_tokens: int = 256,
                 batch_size: int = 16, progress: bool = True, name: str | None = None) -> None:
        from saesteer.models import model_name

        ensure(max_answer_tokens >= 1, f"max_answer_tokens must be ≥ 1, got {max_answer_tokens}")
        self.model, self.tok, self.threshold = model, tok, float(threshold)
        self.max_answer_tokens, self.batch_size, self.progress = max_answer_tokens, batch_size, progress
        self.model_name = model_name(model)
        self._name = name

    def name_detail(self) -> str:
        return ""

    @property
    def name(self) -> str:
        return self._name or f"{self.kind}:{self.model_name}{self.name_detail()}@{self.threshold:+.3g}"

    def contexts(self, prompts: Sequence[str], answers: Sequence[str]) -> list[str]:
        """The chat-formatted judge prompt of each item (reply cut to ``max_answer_tokens`` judge tokens)."""
        return judge_chat_texts(self.tok, prompts, answers, self.max_answer_tokens)

    def scores(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def judge(self, prompts: Sequence[str], answers: Sequence[str]) -> list[Verdict]:
        return [Verdict(s >= self.threshold, raw=f"{s:+.4f}") for s in self.scores(prompts, answers)]


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """P(score of a random positive > score of a random negative), ties counting half (``core.auroc``); nan when one
    class is missing."""
    import torch

    from saesteer.core import auroc

    def col(xs: list[float]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.float64).reshape(-1, 1)

    return float(auroc(col([s for s, y in zip(scores, labels) if y]), col([s for s, y in zip(scores, labels) if not y]))[0])


def balanced_accuracy(pred: Sequence[bool], labels: Sequence[bool]) -> float:
    """Mean of the recall on refusals and on compliances (nan when a class is missing)."""
    pos = [p for p, y in zip(pred, labels) if y]
    neg = [not p for p, y in zip(pred, labels) if not y]
    if not pos or not neg:
        return float("nan")
    return (sum(pos) / len(pos) + sum(neg) / len(neg)) / 2


def fit_threshold(scores: Sequence[float], labels: Sequence[bool]) -> tuple[float, float]:
    """``(threshold, balanced accuracy)``: the cut between two neighbouring distinct scores (their midpoint; below the
    lowest / above the highest at the ends) that maximises balanced accuracy of ``score >= threshold`` → refusal;
    ties go to the cut closest to 0 (the uncalibrated judge's)."""
    ensure(len(scores) == len(labels) and len(scores) > 0, "fit_threshold needs as many labels as scores, ≥ 1")
    ensure(any(labels) and not all(labels), "fit_threshold needs both refusals and compliances among the labels")
    xs = sorted(set(float(s) for s in scores))
    cuts = [xs[0] - 1.0] + [(a + b) / 2 for a, b in zip(xs, xs[1:])] + [xs[-1] + 1.0]
    best = max(cuts, key=lambda t: (round(balanced_accuracy([s >= t for s in scores], labels), 12), -abs(t)))
    return best, balanced_accuracy([s >= best for s in scores], labels)


def split_by_prompt(rows: Sequence[dict], seed: int = 0, fit_share: float = 0.5) -> tuple[list[dict], list[dict]]:
    """``(fit, held_out)``: the distinct prompts shuffled with ``seed``, the first ``fit_share`` of them (and every
    row answering them) to fit, the rest held out."""
    ensure(0 < fit_share < 1, f"fit_share must be in (0, 1), got {fit_share}")
    prompts = sorted({r["prompt"] for r in rows})
    random.Random(seed).shuffle(prompts)
    fit = set(prompts[:max(1, round(len(prompts) * fit_share))])
    return [r for r in rows if r["prompt"] in fit], [r for r in rows if r["prompt"] not in fit]


def score_report(scores: Sequence[float], labels: Sequence[bool], threshold: float) -> dict[str, Any]:
    """Agreement of ``score >= threshold`` with the labels (accuracy with CI, kappa, confusion), the threshold,
    balanced accuracy and ROC AUC."""
    v = [Verdict(s >= threshold) for s in scores]
    return {**agreement(v, list(labels)), "threshold": threshold,
            "balanced_accuracy": balanced_accuracy([x.label for x in v], labels), "auc": roc_auc(scores, labels)}


def held_out_report(rows: Sequence[dict], scores: Sequence[float], threshold: float,
                    baselines: Sequence[Any] = ()) -> dict[str, Any]:
    """The ``held_out`` block of a calibration report: n, refusals, the fitted (``calibrated``) and threshold-0
    (``uncalibrated``) :func:`score_report`, the rows' ids, scores and labels (the plot reads them) and each baseline
    judge on the same rows."""
    y = [bool(r["is_refusal"]) for r in rows]
    return {"n": len(rows), "n_refusal": sum(y), "calibrated": score_report(scores, y, threshold),
            "uncalibrated": score_report(scores, y, 0.0), "ids": [r["id"] for r in rows],
            "scores": [round(s, 4) for s in scores], "is_refusal": y, "baselines": baseline_reports(baselines, rows)}


def baseline_reports(baselines: Sequence[Any], rows: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """Each judge of ``baselines`` (e.g. the prefix judge) scored against the labels of ``rows``: agreement and
    balanced accuracy, keyed by the judge's name."""
    y = [bool(r["is_refusal"]) for r in rows]
    out = {}
    for b in baselines:
        vs = b.judge([r["prompt"] for r in rows], [r["answer"] for r in rows])
        out[b.name] = {**agreement(vs, y), "balanced_accuracy": balanced_accuracy([bool(x.label) for x in vs], y)}
    return out


def calibration_plot(report: dict[str, Any], path: str | Path) -> Path:
    """PNG of a calibration's held-out half (a ``calibrate`` report of :mod:`.logitjudge` or :mod:`.probejudge`;
    ``score_label`` names its score axis): the score histogram of the human-labelled
    refusals and compliances with the fitted threshold (solid) and 0 (dashed), and the ROC curve with the fitted
    operating point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saesteer.core import atomic_write_bytes, figure_png

    scores, labels = report["held_out"]["scores"], report["held_out"]["is_refusal"]
    ref = [s for s, y in zip(scores, labels) if y]
    com = [s for s, y in zip(scores, labels) if not y]
    t = report["threshold"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    lo, hi = min(scores + [t, 0.0]), max(scores + [t, 0.0])
    bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
    a.hist(com, bins=bins, alpha=0.6, color="#2ca02c", label=f"human: compliance (n={len(com)})")
    a.hist(ref, bins=bins, alpha=0.6, color="#d62728", label=f"human: refusal (n={len(ref)})")
    a.axvline(t, color="k", label=f"fitted threshold {t:+.2f}")
    a.axvline(0.0, color="k", ls="--", lw=1, label="0 (uncalibrated)")
    a.set_xlabel(report.get("score_label", "log p(REFUSAL) - log p(COMPLIANCE)"))
    a.set_ylabel("held-out answers")
    a.legend(fontsize=7)
    a.set_title(f"{report['model']}: held-out scores", fontsize=9)
    cuts = sorted(set(scores), reverse=True)
    tpr = [0.0] + [sum(s >= c for s in ref) / max(len(ref), 1) for c in cuts]
    fpr = [0.0] + [sum(s >= c for s in com) / max(len(com), 1) for c in cuts]
    b.plot(fpr, tpr, color="#1f77b4")
    b.plot([0, 1], [0, 1], color="#999999", ls=":", lw=1)
    cal = report["held_out"]["calibrated"]
    b.plot([cal["confusion"]["fp"] / max(len(com), 1)], [cal["confusion"]["tp"] / max(len(ref), 1)], "ko",
           label=f"fitted threshold: accuracy {cal['accuracy']['rate']:.2f}, κ {cal['kappa']:.2f}")
    b.set_xlabel("false refusal rate (compliances called refusal)")
    b.set_ylabel("refusal recall")
    b.set_title(f"ROC, AUC {cal['auc']:.3f}", fontsize=9)
    b.legend(fontsize=7, loc="lower right")
    return atomic_write_bytes(path, figure_png(fig, dpi=110, tight=True))


def dtype_name(model: Any) -> str:
    try:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    except (StopIteration, AttributeError):
        return ""


def read_calibration_file(path: str | Path, kind: str, what: str) -> dict[str, Any]:
    """A calibration file of ``kind`` written by ``saesteer eval calibrate-judge`` (one clear error on anything else;
    ``what`` names the judge in it)."""
    p = Path(path)
    ensure(p.is_file(), f"judge calibration file not found: {p}")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaesteerError(f"{p}: not a JSON calibration file ({e})") from None
    ensure(isinstance(d, dict) and d.get("kind") == kind and isinstance(d.get("model"), str)
           and isinstance(d.get("threshold"), (int, float)),
           f"{p}: not a {what} calibration (write one with `saesteer eval calibrate-judge`)")
    return d

"""ProbeJudge: a logistic-regression probe on a local model's residual stream, fitted on human refusal labels.

The generative and log-odds judges ask a small model to *say* whether an answer refused; a 0.5B model says it poorly
(the calibrated log-odds judge: κ 0.26 against XSTest's labels). Whether an answer refuses is, however, linearly
readable from a model's residual stream (the refusal direction of Arditi et al. is one such read). This judge reads
the judge chat of :class:`~saesteer.evals.logitjudge.LogitJudge` (:func:`~saesteer.evals.judges.judge_messages`, the
reply cut to ``max_answer_tokens`` judge tokens, then the assistant turn's opening) and takes the residual after one
decoder layer at the last token — the forward stops there (:func:`saesteer.models.run_to_layers`), so no later layer
and no LM head run. The score is a standardised logistic regression::

    score = coef · (h - mean) / scale + intercept        refusal when score >= threshold

:func:`calibrate` fits it on one half of a human-labelled set split by prompt (as the log-odds judge's calibration,
:mod:`.calibration`): for each candidate layer and regularisation ``C``, a balanced logistic regression is scored by
out-of-fold ROC AUC over folds of whole prompts; the best pair is refitted on the whole fit half, and the threshold is
the best balanced accuracy over its out-of-fold scores (never over scores of rows it was trained on). The held-out
half is reported as for the log-odds judge. ``cuts`` adds each answer cut to its first k tokens, fitted and reported
alike: the stubs a judge meets where generation stopped at the prefix judge's decision (a probe fitted on whole
answers alone called most 3-token "I'm sorry" stubs compliance). The calibration file (``saesteer eval calibrate-judge --kind probe``)
holds the probe's numbers (plain JSON, no pickle) and is the judge spec ``probe:FILE.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from saesteer.core import ensure, standardise_fit

from .calibration import (
    ScoringJudge,
    baseline_reports,
    dtype_name,
    fit_threshold,
    held_out_report,
    read_calibration_file,
    roc_auc,
    score_report,
    split_by_prompt,
)
from .judges import judge_chat_texts, register_judge_kind

CALIBRATION_KIND = "saesteer-probe-judge"
#: Candidate layers as fractions of the model's depth (the residual after that decoder layer).
LAYER_FRACTIONS = (0.25, 0.375, 0.5, 0.625, 0.75)
#: Inverse regularisation strengths tried for the logistic regression (standardised features).
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
SCORE_LABEL = "probe score (standardised logistic regression, logit)"


def default_layers(n_layers: int) -> list[int]:
    """The candidate layers of a model with ``n_layers`` decoder layers (:data:`LAYER_FRACTIONS`, distinct)."""
    return sorted({min(n_layers - 1, max(0, round(f * n_layers))) for f in LAYER_FRACTIONS})


def last_token_residuals(model: Any, tok: Any, texts: Sequence[str], layers: Sequence[int], batch_size: int = 8,
                         progress: bool = True, label: str = "probe judge") -> dict[int, torch.Tensor]:
    """``{layer: [n, d] float32}``: the residual after each of ``layers`` at the last token of each text, from
    right-padded batches of similar length (each text sees positions 0..n-1 as it would alone)."""
    from saesteer.activations import pad_right
    from saesteer.core import progress_bar
    from saesteer.models import check_layer, run_to_layers

    layers = [check_layer(model, layer) for layer in layers]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    out = {layer: torch.zeros(len(ids), 0) for layer in layers}
    if not ids:
        return out
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    with torch.inference_mode(), progress_bar(len(ids), label, unit="answer", enabled=progress) as bar:
        for b0 in range(0, len(order), max(1, batch_size)):
            idx = order[b0:b0 + batch_size]
            inp, mask = pad_right([ids[i] for i in idx], pad)
            hs = run_to_layers(model, inp.to(device), mask.to(device), layers)
            last = (mask.sum(1) - 1).to(device)
            for layer in layers:
                chunks[layer].append(hs[layer][torch.arange(len(idx), device=device), last].float().cpu())
            bar.update(len(idx))
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))  # row i of the output is the text i, whatever its batch
    return {layer: torch.cat(chunks[layer])[back] for layer in layers}


def probe_scores(h: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, coef: torch.Tensor,
                 intercept: float) -> list[float]:
    """``coef · (h - mean) / scale + intercept`` per row of ``h`` (float64)."""
    return (((h.double() - mean) / scale) @ coef + intercept).tolist()


class ProbeJudge(ScoringJudge):
    """``score >= threshold`` → refusal; ``score`` a standardised logistic regression on the residual after
    ``layer`` at the last token of the judge chat. Named ``probe:MODEL/LLAYER@THRESHOLD``."""

    kind = "probe"

    def __init__(self, model: Any, tok: Any, layer: int, coef: Sequence[float], intercept: float,
                 mean: Sequence[float], scale: Sequence[float], threshold: float = 0.0, max_answer_tokens: int = 256,
                 batch_size: int = 8, progress: bool = True, name: str | None = None) -> None:
        from saesteer.models import check_layer, d_model

        super().__init__(model, tok, threshold, max_answer_tokens, batch_size, progress, name)
        self.layer = check_layer(model, layer)
        self.coef = torch.as_tensor(coef, dtype=torch.float64)
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.scale = torch.as_tensor(scale, dtype=torch.float64)
        self.intercept = float(intercept)
        d = d_model(model)
        ensure(self.coef.shape == self.mean.shape == self.scale.shape == (d,),
               f"the probe has {tuple(self.coef.shape)} weights but the model's residual width is {d}")
        ensure(bool((self.scale > 0).all()), "the probe's feature scales must be positive")

    def name_detail(self) -> str:
        return f"/L{self.layer}"

    def scores_from(self, h: torch.Tensor) -> list[float]:
        """The probe's score of residual rows ``[n, d]``."""
        return probe_scores(h, self.mean, self.scale, self.coef, self.intercept)

    def scores(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        texts = self.contexts(prompts, answers)
        h = last_token_residuals(self.model, self.tok, texts, [self.layer], self.batch_size, self.progress,
                                 f"probe judge {self.model_name}")[self.layer]
        return self.scores_from(h) if len(texts) else []


# --------------------------------------------------------------------------------------------- fitting
def _fit_lr(x: torch.Tensor, y: Sequence[bool], C: float, seed: int) -> dict[str, Any]:
    """A balanced logistic regression on features standardised with ``x``'s own mean and scale."""
    from sklearn.linear_model import LogisticRegression

    x = x.double()
    mean, scale = standardise_fit(x, eps=1e-8)
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=5000, random_state=seed)
    clf.fit(((x - mean) / scale).numpy(), [int(v) for v in y])
    return {"coef": torch.from_numpy(clf.coef_[0]).double(), "intercept": float(clf.intercept_[0]),
            "mean": mean, "scale": scale}


def out_of_fold_scores(x: torch.Tensor, y: Sequence[bool], groups: Sequence[str], C: float, folds: int = 5,
                       seed: int = 0) -> list[float]:
    """Each row's score from a probe fitted (standardisation included) on the folds without its group; groups (the
    prompts) never straddle a fold."""
    from sklearn.model_selection import GroupKFold

    k = min(folds, len(set(groups)))
    ensure(k >= 2, "the probe's cross-validation needs rows of at least two prompts")
    out = [0.0] * len(y)
    for tr, te in GroupKFold(n_splits=k).split(x.numpy(), list(y), list(groups)):
        ytr = [y[i] for i in tr]
        ensure(any(ytr) and not all(ytr), "a cross-validation fold has only one class; use more labelled rows")
        p = _fit_lr(x[torch.as_tensor(tr)], ytr, C, seed)
        for i, s in zip(te, probe_scores(x[torch.as_tensor(te)], p["mean"], p["scale"], p["coef"], p["intercept"])):
            out[int(i)] = s
    return out


def select_probe(feats: dict[int, torch.Tensor], y: Sequence[bool], groups: Sequence[str],
                 Cs: Sequence[float] = C_GRID, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """The (layer, C) with the best out-of-fold ROC AUC (ties: the shallower layer, then the smaller C), its
    out-of-fold scores and threshold, and the grid of AUCs ``{layer: {C: auc}}``."""
    ensure(any(y) and not all(y), "fitting a probe judge needs both refusals and compliances among the labels")
    grid: dict[int, dict[float, float]] = {}
    best = None
    for layer in sorted(feats):
        grid[layer] = {}
        for C in Cs:
            s = out_of_fold_scores(feats[layer], y, groups, C, folds, seed)
            auc = roc_auc(s, y)
            grid[layer][C] = auc
            if best is None or round(auc, 12) > round(best[0], 12):
                best = (auc, layer, C, s)
    auc, layer, C, s = best  # type: ignore[misc]
    t, bacc = fit_threshold(s, y)
    return {"layer": layer, "C": C, "auc": auc, "threshold": t, "balanced_accuracy": bacc, "scores": s,
            "grid": grid}


def cut_rows(tok: Any, rows: Sequence[dict], cuts: Sequence[int]) -> list[dict]:
    """Each row again with its answer cut to its first ``k`` tokens of ``tok``, for each ``k`` of ``cuts`` shorter
    than the answer (id ``ID@k``, ``cut`` = k, the same prompt and label): the stubs a judge meets when generation
    stopped early (the prefix judge's early stop leaves ~3-24 tokens)."""
    out = []
    for r in rows:
        ids = tok.encode(r["answer"], add_special_tokens=False)
        for k in sorted(set(cuts)):
            if 0 < k < len(ids):
                out.append({**r, "id": f"{r['id']}@{k}", "answer": tok.decode(ids[:k]), "cut": k})
    return out


def calibrate(model: Any, tok: Any, rows: Sequence[dict], layers: Sequence[int] | None = None, seed: int = 0,
              fit_share: float = 0.5, max_answer_tokens: int = 256, batch_size: int = 8, Cs: Sequence[float] = C_GRID,
              folds: int = 5, cuts: Sequence[int] = (), baselines: Sequence[Any] = (), progress: bool = True,
              say: Callable[[str], None] | None = None) -> tuple[ProbeJudge, dict[str, Any]]:
    """Fit a probe judge on a prompt-split half of human-labelled ``rows`` (``{id, prompt, answer, is_refusal}``) and
    report it on the other half (as :func:`saesteer.evals.logitjudge.calibrate`, plus the layer / C grid of
    out-of-fold AUCs). With ``cuts``, the fit half also holds each answer cut to its first k tokens (:func:`cut_rows`,
    same label, same prompt fold), and the report adds the held-out half cut the same way (``held_out_cuts``, per k,
    with the baselines on those stubs). Returns the judge and the calibration report (the file ``probe:FILE.json``
    reads)."""
    from saesteer.models import model_name, n_layers

    layers = list(layers) if layers else default_layers(n_layers(model))
    ensure(all(int(k) >= 1 for k in cuts), f"answer cuts must be ≥ 1 token, got {list(cuts)}")
    cuts = sorted({int(k) for k in cuts})
    fit, held = split_by_prompt(rows, seed, fit_share)
    ensure(bool(fit) and bool(held), f"{len(rows)} labelled rows are too few to split into a fit and a held-out half")
    fit_cut, held_cut = cut_rows(tok, fit, cuts), cut_rows(tok, held, cuts)
    fit_all = fit + fit_cut
    if say:
        say(f"[calibrate] probe on {model_name(model)} layers {layers}: {len(fit)} rows to fit (+{len(fit_cut)} cut "
            f"to {list(cuts)} tokens), {len(held)} held out (+{len(held_cut)} cut)")
    every = fit_all + held + held_cut
    texts = judge_chat_texts(tok, [r["prompt"] for r in every], [r["answer"] for r in every], max_answer_tokens)
    feats = last_token_residuals(model, tok, texts, layers, batch_size, progress, f"probe judge {model_name(model)}")
    nf, nh = len(fit_all), len(held)
    fi, hi, ci = torch.arange(nf), torch.arange(nf, nf + nh), torch.arange(nf + nh, len(every))
    y_fit = [bool(r["is_refusal"]) for r in fit_all]
    sel = select_probe({k: v[fi] for k, v in feats.items()}, y_fit, [r["prompt"] for r in fit_all], Cs, folds, seed)
    p = _fit_lr(feats[sel["layer"]][fi], y_fit, sel["C"], seed)
    judge = ProbeJudge(model, tok, sel["layer"], p["coef"], p["intercept"], p["mean"], p["scale"],
                       threshold=sel["threshold"], max_answer_tokens=max_answer_tokens, batch_size=batch_size,
                       progress=progress)
    s_held = judge.scores_from(feats[sel["layer"]][hi])
    s_cut = judge.scores_from(feats[sel["layer"]][ci]) if len(held_cut) else []
    if say:
        say(f"[calibrate] chose layer {sel['layer']}, C {sel['C']} (out-of-fold AUC {sel['auc']:.3f}), threshold "
            f"{sel['threshold']:+.3f}")
    by_cut: dict[str, Any] = {}
    for k in cuts:
        pos = [i for i, r in enumerate(held_cut) if r["cut"] == k]
        if pos:
            rs = [held_cut[i] for i in pos]
            ys = [bool(r["is_refusal"]) for r in rs]
            by_cut[str(k)] = {"n": len(rs), "n_refusal": sum(ys),
                              "calibrated": score_report([s_cut[i] for i in pos], ys, sel["threshold"]),
                              "baselines": baseline_reports(baselines, rs)}
    report = {
        "kind": CALIBRATION_KIND, "model": judge.model_name, "dtype": dtype_name(model), "threshold": sel["threshold"],
        "layer": sel["layer"], "C": sel["C"], "layers": layers, "Cs": list(Cs), "folds": folds,
        "cuts": cuts,
        "max_answer_tokens": max_answer_tokens, "seed": seed, "fit_share": fit_share, "score_label": SCORE_LABEL,
        "fit": {"n": len(fit), "n_cut": len(fit_cut), "n_refusal": sum(y_fit[:len(fit)]),
                "balanced_accuracy": sel["balanced_accuracy"], "auc": sel["auc"], "out_of_fold": True,
                "ids": [r["id"] for r in fit],
                "grid_auc": {str(k): {str(c): a for c, a in v.items()} for k, v in sel["grid"].items()}},
        "held_out": held_out_report(held, s_held, sel["threshold"], baselines),
        "held_out_cuts": by_cut,
        "probe": {"coef": p["coef"].tolist(), "intercept": p["intercept"], "mean": p["mean"].tolist(),
                  "scale": p["scale"].tolist()},
    }
    return judge, report


def read_calibration(path: str | Path) -> dict[str, Any]:
    """A probe-judge calibration file written by ``saesteer eval calibrate-judge --kind probe``."""
    d = read_calibration_file(path, CALIBRATION_KIND, "probe-judge")
    pr = d.get("probe")
    ensure(isinstance(pr, dict) and all(isinstance(pr.get(k), list) for k in ("coef", "mean", "scale"))
           and isinstance(pr.get("intercept"), (int, float)) and isinstance(d.get("layer"), int),
           f"{path}: the probe-judge calibration lacks its probe (layer, coef, intercept, mean, scale)")
    return d


def make_probe_judge(rest: str, device: str = "cpu") -> ProbeJudge:
    """The judge of spec ``probe:FILE.json`` (a calibration: its model, layer, probe, threshold and answer budget)."""
    from saesteer.models import load_model

    ensure(rest.endswith(".json"), "a probe judge is fitted on labels first: probe:CALIBRATION.json "
                                   "(saesteer eval calibrate-judge --kind probe)")
    d = read_calibration(rest)
    pr = d["probe"]
    return ProbeJudge(*load_model(d["model"], device=device, dtype=d.get("dtype") or "auto"), layer=d["layer"],
                      coef=pr["coef"], intercept=pr["intercept"], mean=pr["mean"], scale=pr["scale"],
                      threshold=float(d["threshold"]), max_answer_tokens=int(d.get("max_answer_tokens", 256)))


register_judge_kind("probe", make_probe_judge)

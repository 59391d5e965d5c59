"""Refusal feature discovery (O'Brien et al. 2024, arXiv 2411.11296) plus a contrastive ranking and a clamp grid.

Pipeline of :func:`discover`:

1. **Answers.** ``n_contrast`` harmful and ``n_contrast`` harmless prompts (discovery split) are answered greedily
   (``discovery_tokens`` new tokens) and labelled refusal / compliance by a prefix judge.
2. **Candidates (the paper's method).** The first ``n_archetypes`` harmful prompts are the archetypes. For each
   archetype the model *refused*, the SAE latents on the answer tokens (not the prompt) are counted; a latent that
   fires on at least ``min_refusal_tokens`` tokens of one refusal is a candidate.
3. **Contrastive ranking over all latents.** Per sequence, the mean latent activation over the post-instruction
   positions (chat-template tokens after the user message, e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``; special
   tokens are skipped unless ``include_special``: the SAE never saw those attention sinks) and over the answer tokens.
   Harmful vs harmless prompts (post-instruction) and refusal vs compliance answers: difference of means, AUROC
   (Mann-Whitney, ties averaged), firing frequency per token. ``score = (auroc_post - 0.5) + (auroc_answer - 0.5)``
   orders the candidates (missing groups count as 0.5). ``cos_refusal_dir``: cosine of each decoder row with the
   difference of mean post-instruction residuals, harmful - harmless (Arditi et al.'s direction at this layer).
4. **Grid.** ``n_grid`` candidates, alternately the next best by ``score`` and by ``cos_refusal_dir``, plus the
   ``n_grid_direction`` latents of the whole dictionary closest to the harmful − harmless direction (plus any
   ``features`` given) × clamp values (absolute ``clamps`` and
   ``clamp_multiples`` × the latent's max observed activation) are scored by steering with
   ``steering.Clamp`` on a validation split disjoint from step 1: objective = refusal rate on harmful minus refusal
   rate on harmless prompts; ties go to the higher harmful rate, then to the smaller clamp. The unsteered baseline
   is scored too.
5. **Control.** A live latent unrelated to refusal for sweeps: among non-candidates firing on at least
   ``control_min_freq`` of tokens, the one with the smallest ``|auroc_post - 0.5| + |auroc_answer - 0.5|``.

Clamp values and activations are in the SAE's own latent units (what ``sae.encode`` returns).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from saesteer.core import SaesteerError, auroc, diff_interval, ensure

from .grid import clamp_values, grid_search, heldout_check, make_scorer, refusal_judge
from .latents import SeqLatents, dense_mean, encode_sequences


@dataclass
class DiscoveryConfig:
    """Settings of :func:`discover` (shared by ``saesteer features`` and the Python API)."""

    harmful: str = "arditi-harmful"
    """Data spec of harmful requests (see ``saesteer.data.prompts.load_prompts``; the default's splits are Arditi et al.'s)."""
    harmless: str = "arditi-harmless"
    """Data spec of harmless requests."""
    discovery_split: str | None = "train"
    """Split of both sets that feeds discovery (answers, candidates, ranking); None = the whole set."""
    val_split: str | None = "val"
    """Split used by the grid search. Equal to ``discovery_split`` (or both None): one seeded shuffle, disjoint rows."""
    n_archetypes: int = 6
    """Archetypal harmful prompts whose refusals give the candidates (the first of the discovery harmful prompts)."""
    n_contrast: int = 24
    """Harmful and harmless discovery prompts each (answers feed the contrastive ranking); ≥ n_archetypes."""
    discovery_tokens: int = 24
    """New tokens per discovery answer."""
    min_refusal_tokens: int = 2
    """A latent is a candidate when it fires on at least this many tokens of one refusal."""
    n_grid: int = 6
    """Top candidates (by contrastive score) that enter the grid."""
    n_grid_direction: int = 2
    """Latents from the WHOLE dictionary with the highest cosine to the harmful − harmless direction (and a positive
    ``diff_post``) that also enter the grid, whether or not they fire on refusal tokens: on the default model the
    latent that causes refusal reads harmfulness at the post-instruction positions rather than writing the apology
    (see docs/RESULTS.md)."""
    features: tuple[int, ...] = ()
    """Extra latents to put in the grid whatever their rank."""
    clamps: tuple[float, ...] = ()
    """Absolute clamp values tried for every grid latent."""
    clamp_multiples: tuple[float, ...] = (1.0, 2.0, 4.0)
    """Clamp values as multiples of each latent's max activation observed during discovery."""
    val_limit: int = 24
    """Harmful and harmless validation prompts each for the grid."""
    require_gain: bool = True
    """Only clamps whose validation harmful refusal gain over the unsteered model has a 95 % interval above 0 can be
    chosen (see ``feature_grid.grid_search``); False = the plain objective decides."""
    max_new_tokens: int = 20
    """New tokens per grid answer (a prefix judge needs 16-24); rows stop once decided."""
    batch_size: int = 16
    """Generation and encoding batch size."""
    include_special: bool = False
    """Also encode special tokens (BOS, <|im_end|>, ...) at post-instruction positions."""
    max_norm_ratio: float | None = 10.0
    """Tokens whose residual norm exceeds this × the sequence median are not encoded (attention sinks)."""
    control_min_freq: float = 0.01
    """Minimum per-token firing frequency of the control latent."""
    layer: int | None = None
    """Layer to hook; None = the SAE's own layer."""
    seed: int = 0
    """Seed of the shuffle used when discovery and validation rows come from one split."""
    heldout: str = ""
    """Harmful set (data spec) for a final check of the chosen clamp on rows not used above; empty = skip."""
    heldout_limit: int = 48
    """Held-back prompts in that check (a seeded sample of those left after removing every prompt used above)."""


# --------------------------------------------------------------------------------------------- prompts
@dataclass
class Prompt:
    """One prompt used by discovery, with where it came from (recorded so evals can hold it out)."""

    text: str
    spec: str
    split: str | None
    id: str

    def record(self) -> dict[str, Any]:
        return {"spec": self.spec, "split": self.split, "id": self.id, "prompt": self.text}


def _to_prompts(items: Iterable[Any], spec: str, split: str | None) -> list[Prompt]:
    out = []
    for i, it in enumerate(items):
        text = it if isinstance(it, str) else getattr(it, "prompt", None)
        if not isinstance(text, str):
            raise SaesteerError(f"{spec}: item {i} is not a single-turn text prompt")
        pid = getattr(it, "id", None)
        out.append(Prompt(text=text, spec=spec, split=split, id=str(i if pid is None else pid)))
    return out


def load_split_prompts(spec: str, split: str | None) -> list[Prompt]:
    from saesteer.data import load_prompts

    items = load_prompts(spec, split=split)
    ensure(len(items) > 0, f"prompt set {spec!r} (split {split}) is empty")
    return _to_prompts(items, spec, split)


def discovery_and_val(spec: str, cfg: DiscoveryConfig, n_disc: int) -> tuple[list[Prompt], list[Prompt]]:
    """Discovery and validation prompts of one set: two splits, or disjoint parts of one seeded shuffle."""
    if cfg.discovery_split != cfg.val_split:
        disc = load_split_prompts(spec, cfg.discovery_split)[:n_disc]
        val = load_split_prompts(spec, cfg.val_split)[: cfg.val_limit]
    else:
        allp = load_split_prompts(spec, cfg.discovery_split)
        random.Random(cfg.seed).shuffle(allp)
        ensure(len(allp) > n_disc, f"{spec!r} has {len(allp)} prompts: too few for {n_disc} discovery + validation")
        disc, val = allp[:n_disc], allp[n_disc : n_disc + cfg.val_limit]
    ensure(len(disc) > 0 and len(val) > 0, f"{spec!r}: no discovery or no validation prompts")
    return disc, val


# --------------------------------------------------------------------------------------------- metrics
def _mean_or_nan(x: torch.Tensor) -> torch.Tensor:
    return x.mean(0) if x.shape[0] else torch.full((x.shape[1],), float("nan"))


def contrast(pos: torch.Tensor, neg: torch.Tensor) -> dict[str, torch.Tensor]:
    """Difference of means, AUROC and per-group mean of ``pos [n1, F]`` vs ``neg [n2, F]``."""
    mp, mn = _mean_or_nan(pos), _mean_or_nan(neg)
    return {"diff": mp - mn, "auroc": auroc(pos, neg).float(), "mean_pos": mp, "mean_neg": mn}


def firing_counts(seq: SeqLatents, mask: torch.Tensor, num_latents: int) -> torch.Tensor:
    """How many positions in ``mask`` each latent fires on (activation > 0)."""
    idx = seq.idx[mask]
    fired = seq.acts[mask] > 0
    return torch.bincount(idx[fired], minlength=num_latents)


def find_candidates(
    seqs: Sequence[SeqLatents], refused: Sequence[bool], num_latents: int, min_tokens: int = 2
) -> list[dict[str, Any]]:
    """The paper's candidates: latents firing on ≥ ``min_tokens`` answer tokens of at least one refused answer.

    Each entry: ``latent``, ``n_refusals`` (refusals where it passed the bar), ``n_tokens`` (answer tokens it fired
    on across all refusals) and ``max_act`` on those tokens; sorted by n_refusals then n_tokens.
    """
    passed = torch.zeros(num_latents, dtype=torch.long)
    tokens = torch.zeros(num_latents, dtype=torch.long)
    mx = torch.zeros(num_latents)
    for s, r in zip(seqs, refused):
        if not r or not bool(s.answer.any()):
            continue
        c = firing_counts(s, s.answer, num_latents)
        passed += (c >= min_tokens).long()
        tokens += c
        a, i = s.acts[s.answer].flatten(), s.idx[s.answer].flatten()
        mx = mx.scatter_reduce(0, i, a, reduce="amax")
    lat = torch.nonzero(passed > 0).flatten().tolist()
    out = [{"latent": f, "n_refusals": int(passed[f]), "n_tokens": int(tokens[f]), "max_act": float(mx[f])} for f in lat]
    return sorted(out, key=lambda d: (-d["n_refusals"], -d["n_tokens"], d["latent"]))


def refusal_direction_cos(seqs: Sequence[SeqLatents], harmful: Sequence[bool], W_dec: torch.Tensor) -> torch.Tensor:
    """Cosine of each decoder row with the difference of mean post-instruction residuals, harmful - harmless
    (Arditi et al.'s refusal direction at this layer); NaN when a group has no post-instruction positions."""
    hr = [s.post_resid for s, h in zip(seqs, harmful) if h and s.post_resid is not None]
    sr = [s.post_resid for s, h in zip(seqs, harmful) if not h and s.post_resid is not None]
    if not hr or not sr:
        return torch.full((W_dec.shape[0],), float("nan"))
    r = torch.stack(hr).mean(0) - torch.stack(sr).mean(0)
    return torch.nn.functional.cosine_similarity(W_dec.detach().float().cpu(), r.unsqueeze(0), dim=1)


def contrastive_ranking(
    seqs: Sequence[SeqLatents], harmful: Sequence[bool], refused: Sequence[bool], num_latents: int,
    W_dec: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """All-latent metrics: post-instruction harmful vs harmless, answer refusal vs compliance, frequency, max, and
    (given the decoder ``W_dec``) each decoder row's cosine with the refusal direction."""
    post = torch.stack([dense_mean(s, s.post, num_latents) for s in seqs])
    ans = torch.stack([dense_mean(s, s.answer, num_latents) for s in seqs])
    h = torch.tensor(list(harmful), dtype=torch.bool)
    r = torch.tensor(list(refused), dtype=torch.bool)
    has_ans = torch.tensor([bool(s.answer.any()) for s in seqs])
    cp = contrast(post[h], post[~h])
    ca = contrast(ans[r & has_ans], ans[~r & has_ans])
    fired = torch.zeros(num_latents)
    fired_r, fired_c = torch.zeros(num_latents), torch.zeros(num_latents)
    n_tok = n_r = n_c = 0
    mx = torch.zeros(num_latents)
    for s, ref in zip(seqs, refused):
        c = firing_counts(s, s.valid, num_latents).float()
        fired += c
        n_tok += int(s.valid.sum())
        ca_s = firing_counts(s, s.answer, num_latents).float()
        if ref:
            fired_r, n_r = fired_r + ca_s, n_r + int(s.answer.sum())
        else:
            fired_c, n_c = fired_c + ca_s, n_c + int(s.answer.sum())
        mx = mx.scatter_reduce(0, s.idx[s.valid].flatten(), s.acts[s.valid].flatten(), reduce="amax")
    nan = float("nan")
    score = (torch.nan_to_num(cp["auroc"], nan=0.5) - 0.5) + (torch.nan_to_num(ca["auroc"], nan=0.5) - 0.5)
    return {
        "diff_post": cp["diff"], "auroc_post": cp["auroc"], "mean_post_harmful": cp["mean_pos"],
        "mean_post_harmless": cp["mean_neg"], "diff_answer": ca["diff"], "auroc_answer": ca["auroc"],
        "mean_answer_refusal": ca["mean_pos"], "mean_answer_compliance": ca["mean_neg"],
        "freq": fired / max(n_tok, 1),
        "freq_refusal": fired_r / n_r if n_r else torch.full((num_latents,), nan),
        "freq_compliance": fired_c / n_c if n_c else torch.full((num_latents,), nan),
        "max_act": mx, "score": score,
        **({"cos_refusal_dir": refusal_direction_cos(seqs, harmful, W_dec)} if W_dec is not None else {}),
    }


def pick_control(ranking: dict[str, torch.Tensor], exclude: Iterable[int], min_freq: float = 0.01) -> int | None:
    """A frequently firing latent with no harmful/harmless or refusal/compliance signal (the paper's control)."""
    dev = (torch.nan_to_num(ranking["auroc_post"], nan=0.5) - 0.5).abs() + (
        torch.nan_to_num(ranking["auroc_answer"], nan=0.5) - 0.5
    ).abs()
    ok = ranking["freq"] >= min_freq
    for f in exclude:
        ok[f] = False
    if not bool(ok.any()):
        return None
    dev = torch.where(ok, dev, torch.full_like(dev, float("inf")))
    return int(torch.argmin(dev))


def grid_candidates(cands: Sequence[dict[str, Any]], n: int) -> list[int]:
    """``n`` candidates for the grid, taken in turn from two orders: contrastive ``score`` and ``cos_refusal_dir``
    (a latent can be active on refusals without being causal; the direction cosine is a causal hint)."""
    def order(key: str) -> list[int]:
        return [c["latent"] for c in sorted(cands, key=lambda c: (-_nan_low(c.get(key)), c["latent"]))]

    a, b = order("score"), order("cos_refusal_dir")
    both = [f for pair in zip(a, b) for f in pair]
    return list(dict.fromkeys(both))[:n]


def direction_latents(ranking: dict[str, torch.Tensor], n: int, exclude: Iterable[int] = ()) -> list[int]:
    """The ``n`` latents with the highest ``cos_refusal_dir`` among those more active on harmful than on harmless
    prompts at the post-instruction positions (``diff_post > 0``), skipping ``exclude``."""
    if n <= 0 or "cos_refusal_dir" not in ranking:
        return []
    cos = torch.nan_to_num(ranking["cos_refusal_dir"].float(), nan=-math.inf)
    ok = torch.nan_to_num(ranking["diff_post"].float(), nan=0.0) > 0
    for f in exclude:
        ok[f] = False
    cos = torch.where(ok, cos, torch.full_like(cos, -math.inf))
    order = torch.argsort(cos, descending=True, stable=True)
    return [int(f) for f in order[: int(ok.sum())][:n]]


def _nan_low(x: float | None) -> float:
    return -math.inf if x is None or math.isnan(x) else x


# --------------------------------------------------------------------------------------------- discover
@dataclass
class Discovery:
    """Everything :func:`discover` found; ``files()`` maps output file names to JSON objects."""

    config: dict[str, Any]
    answers: list[dict[str, Any]]
    candidates: list[dict[str, Any]]
    ranking: dict[str, torch.Tensor]
    grid: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    seqs: list[SeqLatents] = field(default_factory=list)
    """Encoded discovery conversations (prompt + answer): the text set for feature cards."""
    grid_answers: list[dict[str, Any]] = field(default_factory=list)
    heldout: dict[str, Any] = field(default_factory=dict)

    def ranking_json(self, top: int = 50) -> dict[str, Any]:
        cols = {k: [None if math.isnan(x) else round(x, 6) for x in v.tolist()] for k, v in self.ranking.items()}
        order = torch.argsort(torch.nan_to_num(self.ranking["score"], nan=-9.0), descending=True)[:top].tolist()
        top_rows = [{"latent": f, **{k: cols[k][f] for k in cols}} for f in order]
        return {"n_latents": len(cols["score"]), "score": "(auroc_post - 0.5) + (auroc_answer - 0.5)",
                "top": top_rows, "metrics": cols}

    def files(self) -> dict[str, Any]:
        return {"candidates.json": {"config": self.config, "archetype_answers": self.answers[: self.config[
            "n_archetypes"]], "candidates": self.candidates}, "ranking.json": self.ranking_json(),
            "grid.json": self.grid, "selection.json": self.selection, **({"heldout.json": self.heldout}
                                                                        if self.heldout else {})}


def _control_clamp(best: dict[str, Any], ranking: dict[str, torch.Tensor], control: int | None) -> float | None:
    """The chosen clamp transferred to the control latent: the same multiple of its own max, or the same value."""
    if control is None:
        return None
    how = str(best["clamp_from"])
    if how.endswith("x max"):
        return round(float(how.split("x")[0]) * float(ranking["max_act"][control]), 4)
    return best["clamp"]


def discover(
    model: Any, tok: Any, sae: Any, cfg: DiscoveryConfig, grid: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Discovery:
    """Run discovery (answers → candidates → ranking) and, when ``grid``, the clamp grid and selection."""
    from saesteer.generation import GenerationConfig, generate

    say = progress or (lambda _m: None)
    ensure(cfg.n_archetypes >= 1 and cfg.n_contrast >= cfg.n_archetypes,
           f"need 1 ≤ n_archetypes ({cfg.n_archetypes}) ≤ n_contrast ({cfg.n_contrast})")
    ensure(cfg.val_limit >= 1 and cfg.max_new_tokens >= 1 and cfg.min_refusal_tokens >= 1, "limits must be ≥ 1")
    layer = cfg.layer if cfg.layer is not None else sae.require_layer()
    n_lat = int(sae.num_latents)
    for f in cfg.features:
        ensure(0 <= f < n_lat, f"feature {f} is out of range: the SAE has {n_lat} latents (0..{n_lat - 1})")
    harm_d, harm_v = discovery_and_val(cfg.harmful, cfg, cfg.n_contrast)
    safe_d, safe_v = discovery_and_val(cfg.harmless, cfg, cfg.n_contrast)
    is_refusal, stop_when, judge_name = refusal_judge()
    disc = harm_d + safe_d
    say(f"answering {len(disc)} discovery prompts ({cfg.discovery_tokens} new tokens)")
    outs = generate(model, tok, [p.text for p in disc],
                    GenerationConfig(max_new_tokens=cfg.discovery_tokens, batch_size=cfg.batch_size,
                                     progress=progress is not None))
    harmful = [i < len(harm_d) for i in range(len(disc))]
    refused = [bool(is_refusal(o)) for o in outs]
    answers = [{**p.record(), "harmful": h, "answer": o, "refusal": r} for p, h, o, r in zip(disc, harmful, outs, refused)]
    say(f"encoding {len(disc)} conversations with the SAE at layer {layer}")
    seqs = encode_sequences(model, tok, sae, layer, [(p.text, o) for p, o in zip(disc, outs)],
                            batch_size=cfg.batch_size, include_special=cfg.include_special,
                            max_norm_ratio=cfg.max_norm_ratio)
    arche = list(range(min(cfg.n_archetypes, len(harm_d))))
    cands = find_candidates([seqs[i] for i in arche], [refused[i] for i in arche], n_lat, cfg.min_refusal_tokens)
    ranking = contrastive_ranking(seqs, harmful, refused, n_lat, sae.W_dec)
    for c in cands:
        for key in ("score", "auroc_post", "auroc_answer", "cos_refusal_dir", "max_act"):
            c[key if key != "max_act" else "max_act_all"] = float(ranking[key][c["latent"]])
    config = {**asdict(cfg), "layer": layer, "judge": judge_name, "num_latents": n_lat}
    res = Discovery(config=config, answers=answers, candidates=cands, ranking=ranking, seqs=seqs)
    grid_feats = grid_candidates(cands, cfg.n_grid)
    grid_feats = list(dict.fromkeys(grid_feats + direction_latents(ranking, cfg.n_grid_direction, grid_feats)
                                    + list(cfg.features)))
    control = pick_control(ranking, [c["latent"] for c in cands] + grid_feats, cfg.control_min_freq)
    used = {"discovery": [p.record() for p in disc], "validation": [p.record() for p in harm_v + safe_v]}
    res.selection = {"layer": layer, "num_latents": n_lat, "grid_features": grid_feats, "control": control,
                     "n_refused_archetypes": sum(refused[i] for i in arche), "n_archetypes": len(arche),
                     "prompts_used": used}
    if not grid:
        return res
    ensure(len(grid_feats) > 0, f"no candidate latents: the model refused {sum(refused[i] for i in arche)} of "
           f"{len(arche)} archetypes and no latent fired on ≥ {cfg.min_refusal_tokens} refusal tokens")
    settings = [(f, v, how) for f in grid_feats
                for v, how in clamp_values(float(ranking["max_act"][f]), cfg.clamps, cfg.clamp_multiples)]
    scorer = make_scorer(model, tok, sae, [p.text for p in harm_v], [p.text for p in safe_v], cfg.max_new_tokens,
                         cfg.batch_size, res.grid_answers)
    base, rows, best = grid_search(settings, scorer, say, require_gain=cfg.require_gain)
    res.grid = {"objective": "refusal rate on harmful - refusal rate on harmless (validation)"
                + (", among clamps whose harmful refusal gain is significant" if cfg.require_gain else ""),
                "n_harmful": len(harm_v), "n_harmless": len(safe_v), "max_new_tokens": cfg.max_new_tokens,
                "baseline": base, "rows": rows}
    res.selection.update({
        "feature": best["feature"], "clamp": best["clamp"], "clamp_from": best["clamp_from"], "best": best,
        "baseline": base, "improves_over_baseline": best["objective"] > base["objective"],
        "gain_significant": best["gain_significant"],
        "harmful_refusal_gain": diff_interval(best["harmful_refusal"]["k"], best["harmful_refusal"]["n"],
                                              base["harmful_refusal"]["k"], base["harmful_refusal"]["n"]),
        "control_clamp": _control_clamp(best, ranking, control),
    })
    if cfg.heldout:
        used_text = {p.text for p in disc + harm_v + safe_v}
        held = [p for p in load_split_prompts(cfg.heldout, None) if p.text not in used_text]
        random.Random(cfg.seed + 1).shuffle(held)
        held = held[: cfg.heldout_limit]
        say(f"held-back check on {len(held)} prompts of {cfg.heldout}")
        res.heldout = heldout_check(model, tok, sae, best["feature"], best["clamp"], held, cfg.max_new_tokens,
                                    cfg.batch_size, res.grid_answers)
    return res

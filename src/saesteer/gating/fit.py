"""Fitting a steering policy: read gate inputs on labelled prompts, fit the gate, cap its FPR on validation prompts.

Prompt sets are ``data.load_prompts`` specs; each item's label (harmful / harmless) decides its side, so mixed sets such
as ``xstest`` work. A ``#LO:HI`` suffix keeps the fraction [LO, HI) of a seeded permutation of the set
(``xstest#0:0.4`` for training, ``xstest#0.4:0.6`` for the threshold), so hard benign prompts (safe prompts that look
harmful) can shape the gate while the rest of the set stays held out. Every prompt used is recorded in the policy's
``meta["used_prompts"]`` (short text hashes, :func:`text_key`) so that ``saesteer compare`` leaves them out of its
evaluations.

Baselines and two-sided policies fit here too:

* ``system``: a fixed system prompt (:data:`~saesteer.gating.policy.SAFETY_SYSTEM_PROMPT`) carried by the policy,
  alone (gate ``always``, no steering) or with steering; gate inputs are read with it in the prompt.
* ``match``: the steering's strength (an ``add``'s alpha, clamp values) is searched over ``match_strengths``
  multipliers so that its unconditional refusal on the *harmful validation* prompts is closest to a target — a rate,
  or the validation refusal of a reference policy (the unconditional clamp): the refusal-direction baseline at the
  clamp's strength. Refusal is measured by a ``refusal_rate`` callable (generation + judge, from
  ``saesteer.evals.refusal_rate``; the gating stage cannot import the evals).
* ``steering_low``: a two-sided policy; its low threshold is the largest whose share of harmful validation prompts
  steered low is <= ``low_rate`` (:func:`~saesteer.gating.gates.choose_low_threshold`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from saesteer import models
from saesteer.core import SaesteerError, atomic_write_bytes, ensure, rate_summary
from saesteer.generation import encode_prompts
from saesteer.steering import SteeringSpec, load_sae_cached

from .policy import SAFETY_SYSTEM_PROMPT, Policy, check_same_tokenizer, load_gate_model, load_policy
from .windows import WindowRead


def text_key(prompt: Any) -> str:
    """Short hash of a prompt (string or message list) identifying it across datasets and id schemes."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
    return hashlib.sha1(text.strip().encode("utf-8")).hexdigest()[:16]


def item_keys(item: Any) -> set[str]:
    """The text keys an item is known by: its own text and, for a spread-out item (``data.spread``: a conversation or
    document built around a request), that request, so that a set built on a fitted prompt counts it as seen."""
    keys = {text_key(item.messages or item.prompt)}
    req = (item.extra or {}).get("request")
    if isinstance(req, str) and req.strip():
        keys.add(text_key(req))
    return keys


def load_slice(spec: str, limit: int | None = None, seed: int = 0) -> list[Any]:
    """``load_prompts`` plus an optional ``#LO:HI`` fraction of a seeded permutation (then ``limit``)."""
    from saesteer.data import load_prompts

    base, _, frac = spec.partition("#")
    items = load_prompts(base)
    if frac:
        try:
            lo, hi = (float(x) for x in frac.split(":"))
        except ValueError:
            raise SaesteerError(f"bad slice in {spec!r}: expected #LO:HI with fractions, e.g. #0:0.4") from None
        ensure(0 <= lo < hi <= 1, f"bad slice in {spec!r}: need 0 <= LO < HI <= 1")
        order = list(range(len(items)))
        random.Random(seed).shuffle(order)
        keep = sorted(order[round(lo * len(items)):round(hi * len(items))])
        items = [items[i] for i in keep]
    if limit is not None and limit < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in keep]
    return items


@dataclass
class PolicyFitConfig:
    """Settings of :func:`fit_policy` (and ``saesteer policy fit``)."""

    steering: list[SteeringSpec] = field(default_factory=list)
    """What the policy applies when the gate fires (e.g. the clamp chosen by ``saesteer features``)."""
    gate: str = "probe"
    """Gate kind: sae, probe, cast or always (unconditional)."""
    layer: int | None = None
    """Layer the gate reads (default: the first steering layer). A later layer works too: the policy then decides from
    an unsteered lookahead forward up to that layer on every prefill (see ``saesteer.gating.policy``)."""
    positions: int | None = None
    """Trailing prompt tokens the gate reads (default: the chat template's post-instruction tokens)."""
    reduce: str = "mean"
    """Pool the positions by ``mean`` or take the ``last``."""
    fpr: float = 0.02
    """Largest false-positive rate allowed on the benign validation prompts (sets the threshold)."""
    fpr_cap: str = "pooled"
    """``pooled``: the cap holds over all benign validation prompts together; ``per-set``: on each benign validation
    set separately (a small set of hard look-alikes is not outvoted by a large easy one)."""
    strength: str = "hard"
    """hard / linear / sigmoid: how steering strength grows with the gate score above the threshold."""
    train: list[str] = field(default_factory=lambda: ["arditi-harmful:train", "arditi-harmless:train"])
    """Prompt sets to fit the gate on; each item's label (harmful / harmless) decides its side. A trailing ``@W``
    weights a set's prompts in a probe's fit (``jbb-benign#0:0.4@4``)."""
    val: list[str] = field(default_factory=lambda: ["arditi-harmful:val", "arditi-harmless:val"])
    """Prompt sets to choose the threshold on (benign ones set the FPR cap; harmful ones give the TPR)."""
    heldout: list[str] = field(default_factory=list)
    """Optional held-out sets to report the gate's fire rate on (never used for fitting)."""
    limit: int | None = 256
    """Seeded sample size per prompt set (None = all)."""
    top_m: int = 16
    """SAE gate: number of latents it combines."""
    C: float | None = None
    """Inverse L2 strength of the logistic regressions (default 0.1 probe, 1.0 sae)."""
    gate_model: str | None = None
    """Read the gate's residuals from this model instead (same tokenizer, e.g. a bigger model of the family);
    ``layer`` is then its layer and is required."""
    sae: str | None = None
    """SAE path for an ``sae`` gate (default: the steering spec's SAE)."""
    batch_size: int = 16
    """Prompts per forward when reading residuals."""
    cache: str | None = None
    """Folder caching the collected gate inputs (safetensors per prompt list, keyed by model, layer, positions and
    the prompts), so refits with other gates / thresholds skip the forwards."""
    name: str = ""
    """Policy name for comparison tables."""
    seed: int = 0
    """Seed of the per-set subsamples."""
    gate_suffix: str = ""
    """Text appended after each chat-formatted prompt for the gate's read only (a prompted probe, e.g. "Before
    answering, I judge whether this request is harmful or harmless. Verdict: the request is"); the gate reads its
    last tokens from an unsteered lookahead. Empty: the gate reads the prompt's own post-instruction tokens."""
    chat_only: bool = True
    """Record the template's post-instruction token ids so that prompts without them (raw text) are never steered
    (the gate is fitted on those tokens only). False: gate every row on its last tokens."""
    system: str | None = None
    """A fixed system prompt the policy carries (``"safety"``: :data:`SAFETY_SYSTEM_PROMPT`); None: none. With no
    steering at all the policy is the system-prompt baseline (gate ``always``)."""
    steering_low: list[SteeringSpec] = field(default_factory=list)
    """Two-sided policy: what to apply to prompts scored below the low threshold (e.g. ablate the refusal direction);
    empty: one-sided."""
    low_rate: float = 0.02
    """Two-sided policy: largest share of the harmful validation prompts that may be steered low (sets the low
    threshold)."""
    match: str | None = None
    """Match the steering's strength to a validation unsafe refusal: a rate in [0, 1], or a policy file whose refusal
    on the same harmful validation prompts is the target (e.g. the unconditional clamp). None: keep the strength."""
    read: str = "last"
    """What the gate reads of a conversation: ``last`` = the post-instruction tokens after the last user message;
    ``turns`` = the highest score over those after every user turn (a request made turns earlier still fires the
    gate). Validation and held-out scores use the same maximum, scoring each conversation cut after each user turn;
    ``windows`` = ``turns`` and overlapping windows of every user message longer than ``window`` tokens, each read
    as its own one-turn request (``gating.windows``: a harmful sentence inside a long document). The windows of the
    harmless training prompts are harmless training examples too (a window of a benign text is a benign request); a
    harmful prompt's windows are not (which of them holds the harm is unknown)."""
    window: int = 96
    """``read="windows"``: window length in tokens."""
    window_stride: int = 48
    """``read="windows"``: tokens between window starts (a request of up to window - stride + 1 tokens lies whole
    inside one window)."""
    window_split: str = "fixed"
    """``read="windows"``: ``fixed`` windows over each long message, or ``paragraphs``: each paragraph (cut after
    every line-break token) read as its own request, long paragraphs windowed."""
    match_strengths: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0])
    """Multipliers of the steering's strength tried by ``match`` (an ``add`` of alpha 1: the alphas)."""


def template_ids(tok: Any, positions: int) -> list[int]:
    """The last ``positions`` token ids of a chat-formatted prompt: the template's post-instruction tokens."""
    ids = tok(models.format_chat(tok, "x"), add_special_tokens=False)["input_ids"]
    ensure(len(ids) >= positions, f"the chat template yields {len(ids)} tokens, fewer than the {positions} gate positions")
    return [int(i) for i in ids[-positions:]]


def turn_prefixes(prompt: Any) -> list[Any]:
    """The conversations a ``turns`` gate scores: a message list cut after each of its user turns (a plain prompt, or
    a conversation with no user turn, is itself)."""
    if not isinstance(prompt, list):
        return [prompt]
    cuts = [prompt[: i + 1] for i, m in enumerate(prompt) if m.get("role") == "user"]
    return cuts or [prompt]


def gate_inputs_key(model_name: str, layer: int, positions: int, prompts: Sequence[Any],
                    suffix_ids: Sequence[int] | None = None, system: str | None = None) -> str:
    """Key of one collected gate-input tensor (``--cache`` files are ``gate_inputs_{key[:24]}.safetensors``)."""
    parts = [model_name, layer, positions, list(prompts)] + ([list(suffix_ids)] if suffix_ids else [])
    parts += [{"system": system}] if system else []
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def gate_inputs_file(cache: str | Path, key: str) -> Path:
    return Path(cache) / f"gate_inputs_{key[:24]}.safetensors"


def split_weight(spec: str) -> tuple[str, float]:
    """``"jbb-benign#0:0.4@4"`` -> ``("jbb-benign#0:0.4", 4.0)``: a trailing ``@W`` weights the set's prompts in the
    gate's fit (e.g. up-weight benign look-alikes); no suffix -> weight 1."""
    base, at, w = spec.rpartition("@")
    if not at:
        return spec, 1.0
    try:
        weight = float(w)
    except ValueError:
        return spec, 1.0  # an '@' that is part of a path or id, not a weight
    ensure(weight > 0 and math.isfinite(weight), f"bad weight in {spec!r}: need a positive number after '@'")
    return base, weight


def labelled_prompts(specs: Sequence[str], limit: int | None, seed: int, what: str) -> tuple[list[Any], list[Any], list[dict]]:
    """Harmful and harmless prompts of ``specs`` (in order); per set: its name, weight and per-label counts."""
    harm, safe, used = [], [], []
    for full in specs:
        spec, weight = split_weight(full)
        items = load_slice(spec, limit=limit, seed=seed)
        ensure(len(items) > 0, f"{what} set {spec!r} is empty")
        for it in items:
            ensure(it.label in ("harmful", "harmless"), f"{what} set {spec!r}: item {it.id} has no harmful/harmless label")
            (harm if it.label == "harmful" else safe).append(it.messages if it.messages is not None else it.prompt)
        n_h = sum(it.label == "harmful" for it in items)
        used.append({"spec": spec, "n": len(items), "weight": weight, "n_harmful": n_h, "n_harmless": len(items) - n_h,
                     "keys": sorted({k for it in items for k in item_keys(it)})})
    return harm, safe, used


def resolve_system(system: str | None) -> str | None:
    """``"safety"`` → :data:`SAFETY_SYSTEM_PROMPT`; empty → None; any other text as is."""
    if system is None or not system.strip():
        return None
    return SAFETY_SYSTEM_PROMPT if system.strip().lower() == "safety" else system


RefusalRate = Callable[[Any, Sequence[Any]], dict[str, Any]]
"""``refusal_rate(policy, prompts)`` → ``rate_summary`` (``k``, ``n``, ``rate``, ...) of the policy's answers to the
prompts (e.g. :func:`saesteer.evals.refusal_rate` bound to a model, tokenizer and judge)."""


def match_strength(rate_at: Callable[[float], dict[str, Any]], target: float,
                   multipliers: Sequence[float]) -> tuple[float, list[dict[str, Any]]]:
    """Try every multiplier (ascending) and return the one whose refusal rate is closest to ``target`` (ties: the
    smaller multiplier, i.e. the gentler steering) and the table of tries ``[{multiplier, rate, k, n, gap}]``."""
    ms = sorted({float(m) for m in multipliers})
    ensure(len(ms) > 0 and all(math.isfinite(m) and m > 0 for m in ms),
           f"match strengths must be positive numbers, got {list(multipliers)}")
    ensure(0.0 <= target <= 1.0, f"the target refusal rate must be in [0, 1], got {target}")
    table = []
    for m in ms:
        r = rate_at(m)
        table.append({"multiplier": m, **{k: r.get(k) for k in ("rate", "k", "n")}, "gap": abs(r["rate"] - target)})
    best = min(table, key=lambda t: (round(t["gap"], 12), t["multiplier"]))
    return best["multiplier"], table


def _match(model: nn.Module, cfg: PolicyFitConfig, layer: int, refusal_rate: RefusalRate | None, system: str | None,
           harmful: list[Any]) -> tuple[list[SteeringSpec], dict[str, Any]]:
    """The steering at the matched strength and how it was matched (``meta["match"]``): each candidate is the
    steering at one multiplier, unconditional (with the policy's system prompt), answering ``harmful`` (the harmful
    validation prompts, never test items)."""
    from saesteer.steering import with_strength

    from .gates import AlwaysGate

    ensure(refusal_rate is not None, "matching a refusal rate needs a refusal_rate function (saesteer.evals.refusal_rate)")
    ensure(len(cfg.steering) > 0, "--match needs steering whose strength can change (e.g. --direction)")
    ensure(len(harmful) > 0, "--match needs harmful validation prompts (--val)")
    info: dict[str, Any] = {"prompts": "harmful validation prompts", "n": len(harmful)}
    try:
        target = float(cfg.match)  # type: ignore[arg-type]
        info["reference"] = None
    except ValueError:
        ref = load_policy(cfg.match)  # type: ignore[arg-type]
        r = refusal_rate(ref, harmful)
        target = float(r["rate"])
        info.update(reference=str(Path(cfg.match).expanduser().resolve()), reference_name=ref.name,  # type: ignore[arg-type]
                    reference_refusal={k: r.get(k) for k in ("rate", "k", "n")})

    def rate_at(m: float) -> dict[str, Any]:
        cand = Policy(gate=AlwaysGate(layer=layer), steering=[with_strength(s, m) for s in cfg.steering],
                      name=f"x{m:g}", model=models.model_name(model), system=system)
        return refusal_rate(cand, harmful)

    best, table = match_strength(rate_at, target, cfg.match_strengths)
    info.update(target=target, tried=table, multiplier=best)
    return [with_strength(s, best) for s in cfg.steering], info


def _per_set(used: list[dict], label: str, values: Sequence[float] | torch.Tensor) -> dict[str, Any]:
    """Split a pooled per-label sequence back into ``{spec: part}`` per set (sets without that label left out)."""
    out, cut = {}, 0
    for u in used:
        n = u[f"n_{label}"]
        if n:
            out[u["spec"]] = values[cut:cut + n]
        cut += n
    return out


def fit_policy(model: nn.Module, tok: Any, cfg: PolicyFitConfig, progress: bool = True,
               residuals: dict[str, torch.Tensor] | None = None, refusal_rate: RefusalRate | None = None) -> Policy:
    """Fit the gate on ``cfg.train``, set its threshold on ``cfg.val`` (FPR cap), report ``cfg.heldout`` fire rates.

    ``residuals`` (a dict, filled on first use) shares the collected gate inputs between fits of several gate kinds
    with the same data, layer and positions. ``refusal_rate`` measures refusal for ``cfg.match`` (see
    :data:`RefusalRate`). A two-sided policy (``cfg.steering_low``) also gets its low threshold from the harmful
    validation scores; ``cfg.system`` is carried by the policy and read by the gate.
    """
    from .gates import choose_low_threshold, collect_gate_inputs, make_gate, post_instruction_positions

    system = resolve_system(cfg.system)
    ensure(len(cfg.steering) > 0 or len(cfg.steering_low) > 0 or system is not None,
           "fit_policy needs a steering spec (e.g. --sae/--feature/--clamp, --direction), a low side or a system prompt")
    ensure(cfg.gate == "always" or cfg.steering or cfg.steering_low,
           "a policy with only a system prompt is unconditional (the prompt is formatted before any gate reads it): "
           "use --gate always")
    ensure(not (cfg.gate == "always" and cfg.steering_low), "an unconditional policy (gate always) has no low side")
    ensure(0.0 <= cfg.low_rate <= 1.0, f"the low-side rate must be in [0, 1], got {cfg.low_rate}")
    cache: dict[str, Any] = {}
    ivs = [iv for s in cfg.steering for iv in s.build(model, cache)]
    low_ivs = [iv for s in cfg.steering_low for iv in s.build(model, cache)]
    first = min((L for iv in ivs or low_ivs for L in iv.layers(model)), default=0)
    reader, gated_model = model, None
    if cfg.gate_model is not None and cfg.gate != "always":
        ensure(cfg.gate != "sae", "an sae gate reads the steered model's SAE: it cannot use a separate gate model")
        ensure(cfg.layer is not None, "a gate model needs the layer to read (--gate-layer)")
        reader, gate_tok = load_gate_model(cfg.gate_model, str(next(model.parameters()).device))
        check_same_tokenizer(tok, gate_tok, cfg.gate_model)
        gated_model = cfg.gate_model
    layer = models.check_layer(reader, cfg.layer if cfg.layer is not None else first)
    P = cfg.positions or post_instruction_positions(tok)
    suffix_ids = [int(i) for i in tok(cfg.gate_suffix, add_special_tokens=False)["input_ids"]] if cfg.gate_suffix else None
    if suffix_ids is not None:
        ensure(cfg.gate != "always", "an unconditional policy has no gate to give a suffix")
        P = min(P, len(suffix_ids)) if cfg.positions is None else P
        ensure(len(suffix_ids) >= P, f"the gate suffix has {len(suffix_ids)} tokens, fewer than the {P} positions read")
    kw: dict[str, Any] = dict(reduce=cfg.reduce, strength=cfg.strength)
    if cfg.gate in ("probe", "sae") and cfg.C is not None:
        kw["C"] = cfg.C
    if cfg.gate == "sae":
        sae_path = cfg.sae or next((s.sae for s in cfg.steering + cfg.steering_low if s.sae), None)
        ensure(sae_path is not None, "an sae gate needs an SAE (--gate-sae or an SAE in the steering spec)")
        sae = load_sae_cached(sae_path, cache)
        kw.update(sae=sae, sae_path=str(Path(sae_path).expanduser().resolve()), top_m=cfg.top_m)
    gate = make_gate(cfg.gate, layer, P, **kw)
    meta: dict[str, Any] = {"fpr": cfg.fpr, "positions": P}
    pol = Policy(gate=gate, steering=list(cfg.steering), name=cfg.name or cfg.gate, model=models.model_name(model),
                 meta=meta, gate_model=gated_model, gate_suffix=cfg.gate_suffix or None, gate_suffix_ids=suffix_ids,
                 template_ids=template_ids(tok, post_instruction_positions(tok)) if cfg.chat_only else None,
                 system=system, gate_read=cfg.read,
                 gate_window=WindowRead.from_tokenizer(tok, cfg.window, cfg.window_stride, system, cfg.window_split)
                 if cfg.read == "windows" else None)
    pol.check(model, ivs + low_ivs)
    vh, vs, vused = labelled_prompts(cfg.val, cfg.limit, cfg.seed, "val") if cfg.match or cfg.gate != "always" \
        else ([], [], [])
    if cfg.match is not None:  # the strength whose harmful-validation refusal is closest to the target
        pol.steering, meta["match"] = _match(model, cfg, models.check_layer(model, first), refusal_rate, system, vh)
        meta["used_prompts"] = sorted({text_key(p) for p in vh})
    if cfg.gate == "always":
        return pol

    memo = residuals if residuals is not None else {}

    def inputs(prompts: list[Any], desc: str) -> torch.Tensor:
        key = gate_inputs_key(models.model_name(reader), layer, P, prompts, suffix_ids, system)
        if key in memo:
            return memo[key]
        f = gate_inputs_file(cfg.cache, key) if cfg.cache else None
        if f is not None and f.exists():
            from safetensors.torch import load_file

            memo[key] = load_file(str(f))["h"]
        else:
            memo[key] = collect_gate_inputs(reader, tok, prompts, layer, P, cfg.batch_size, progress, desc,
                                            suffix_ids=suffix_ids, system_prefix=system)
            if f is not None:
                from safetensors.torch import save

                atomic_write_bytes(f, save({"h": memo[key].contiguous()}))
        return memo[key]

    def scores(prompts: list[Any], desc: str) -> torch.Tensor:
        """Gate scores as applied: the last turn's (``read="last"``) or the highest over the cut conversations."""
        if cfg.read == "last":
            return gate.score(inputs(prompts, desc))
        cuts = [(i, c) for i, p in enumerate(prompts) for c in turn_prefixes(p)]
        if pol.gate_window is not None:  # and the windows of long user messages, as token ids
            cuts += [(i, v) for i, c in enumerate(encode_prompts(tok, prompts, system_prefix=system))
                     for v in pol.gate_window.views(c)]
        s = gate.score(inputs([c for _, c in cuts], desc)).float()
        owner = torch.tensor([i for i, _ in cuts])
        return torch.full((len(prompts),), float("-inf")).scatter_reduce(0, owner, s, reduce="amax")

    th, ts, used = labelled_prompts(cfg.train, cfg.limit, cfg.seed, "train")
    ensure(len(th) >= 2 and len(ts) >= 2, "train sets need >= 2 harmful and >= 2 harmless prompts")
    weights = {}
    if any(u["weight"] != 1.0 for u in used):
        ensure(cfg.gate == "probe", f"per-set weights (@W) apply to probe gates only, not {cfg.gate!r}")
        for lab in ("harmful", "harmless"):
            weights[f"{lab}_weight"] = torch.cat([torch.full((u[f"n_{lab}"],), u["weight"]) for u in used])
    benign = inputs(ts, "gate train harmless")
    n_win = 0
    if pol.gate_window is not None:  # a window of a harmless text is a harmless request: train on those too
        views = [(i, v) for i, c in enumerate(encode_prompts(tok, ts, system_prefix=system))
                 for v in pol.gate_window.views(c)]
        n_win = len(views)
        if views:
            benign = torch.cat([benign, inputs([v for _, v in views], "gate train harmless windows")])
            if "harmless_weight" in weights:  # each window weighs what its prompt weighs
                w = weights["harmless_weight"]
                weights["harmless_weight"] = torch.cat([w, w[torch.tensor([i for i, _ in views])]])
    gate.fit(inputs(th, "gate train harmful"), benign, **weights)
    meta["train"] = {"sets": [{k: v for k, v in u.items() if k != "keys"} for u in used], "n_harmful": len(th),
                     "n_harmless": len(ts), **({"n_harmless_windows": n_win} if pol.gate_window is not None else {})}
    ensure(len(vs) > 0, "validation sets hold no harmless prompts: the FPR cap needs benign scores")
    ensure(cfg.fpr_cap in ("pooled", "per-set"), f"fpr_cap must be pooled or per-set, got {cfg.fpr_cap!r}")
    hs = scores(vh, "gate val harmful") if vh else None
    bs = scores(vs, "gate val harmless")
    sets = _per_set(vused, "harmless", bs) if cfg.fpr_cap == "per-set" else None
    meta["val"] = {"sets": [{k: v for k, v in u.items() if k != "keys"} for u in vused],
                   **gate.calibrate(bs, hs, cfg.fpr, benign_sets=sets)}
    meta["used_prompts"] = sorted({k for u in used + vused for k in u["keys"]})
    if cfg.steering_low:  # the low side: at most low_rate of the harmful val prompts below its threshold
        ensure(hs is not None, "a two-sided policy needs harmful validation prompts (they set its low threshold)")
        low = min(choose_low_threshold(hs, cfg.low_rate), gate.threshold)
        meta["low"] = {"low_threshold": low, "target_rate": cfg.low_rate,
                       "val_harmful_low": float((hs < low).double().mean()), "val_harmful_n": int(hs.numel()),
                       "val_benign_low": float((bs < low).double().mean()), "val_benign_n": int(bs.numel())}
        pol = dataclasses.replace(pol, steering_low=list(cfg.steering_low), low_threshold=low)
    meta["heldout"] = {}
    seen = set(meta["used_prompts"])
    for spec in cfg.heldout:
        items = [it for it in load_slice(spec, limit=cfg.limit, seed=cfg.seed)
                 if not item_keys(it) & seen]
        ensure(len(items) > 0, f"held-out set {spec!r} is empty (after leaving out the prompts used for fitting)")
        sc, fired, _ = gate.decide_scores(scores([it.messages or it.prompt for it in items], f"gate {spec}"))
        below = sc < pol.low_threshold if pol.low_threshold is not None else None
        labels = sorted({str(it.label) for it in items})
        for lab in labels:  # a mixed set (xstest) gets one fire rate per label: TPR on harmful, FPR on harmless
            sel = [i for i, it in enumerate(items) if str(it.label) == lab]
            name = spec if len(labels) == 1 else f"{spec}[{lab}]"
            meta["heldout"][name] = rate_summary(int(fired[sel].sum()), len(sel))
            if below is not None:  # two-sided: how often the low side would fire there
                meta.setdefault("heldout_low", {})[name] = rate_summary(int(below[sel].sum()), len(sel))
    return pol

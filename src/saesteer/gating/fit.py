"""Fitting a steering policy: read gate inputs on labelled prompts, fit the gate, cap its FPR on validation prompts.

Prompt sets are ``data.load_prompts`` specs; each item's label (harmful / harmless) decides its side, so mixed sets such
as ``xstest`` work. A ``#LO:HI`` suffix keeps the fraction [LO, HI) of a seeded permutation of the set
(``xstest#0:0.4`` for training, ``xstest#0.4:0.6`` for the threshold), so hard benign prompts (safe prompts that look
harmful) can shape the gate while the rest of the set stays held out. Every prompt used is recorded in the policy's
``meta["used_prompts"]`` (short text hashes, :func:`text_key`) so that ``saesteer compare`` leaves them out of its
evaluations.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from saesteer import models
from saesteer.core import SaesteerError, atomic_write_bytes, ensure, rate_summary
from saesteer.steering import SteeringSpec, load_sae_cached

from .policy import Policy, check_same_tokenizer, load_gate_model


def text_key(prompt: Any) -> str:
    """Short hash of a prompt (string or message list) identifying it across datasets and id schemes."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
    return hashlib.sha1(text.strip().encode("utf-8")).hexdigest()[:16]


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


def template_ids(tok: Any, positions: int) -> list[int]:
    """The last ``positions`` token ids of a chat-formatted prompt: the template's post-instruction tokens."""
    ids = tok(models.format_chat(tok, "x"), add_special_tokens=False)["input_ids"]
    ensure(len(ids) >= positions, f"the chat template yields {len(ids)} tokens, fewer than the {positions} gate positions")
    return [int(i) for i in ids[-positions:]]


def gate_inputs_key(model_name: str, layer: int, positions: int, prompts: Sequence[Any],
                    suffix_ids: Sequence[int] | None = None) -> str:
    """Key of one collected gate-input tensor (``--cache`` files are ``gate_inputs_{key[:24]}.safetensors``)."""
    parts = [model_name, layer, positions, list(prompts)] + ([list(suffix_ids)] if suffix_ids else [])
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
                     "keys": [text_key(it.messages or it.prompt) for it in items]})
    return harm, safe, used


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
               residuals: dict[str, torch.Tensor] | None = None) -> Policy:
    """Fit the gate on ``cfg.train``, set its threshold on ``cfg.val`` (FPR cap), report ``cfg.heldout`` fire rates.

    ``residuals`` (a dict, filled on first use) shares the collected gate inputs between fits of several gate kinds
    with the same data, layer and positions.
    """
    from .gates import collect_gate_inputs, make_gate, post_instruction_positions

    ensure(len(cfg.steering) > 0, "fit_policy needs a steering spec (e.g. --sae/--feature/--clamp)")
    cache: dict[str, Any] = {}
    ivs = [iv for s in cfg.steering for iv in s.build(model, cache)]
    first = min(L for iv in ivs for L in iv.layers(model))
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
        sae_path = cfg.sae or next((s.sae for s in cfg.steering if s.sae), None)
        ensure(sae_path is not None, "an sae gate needs an SAE (--gate-sae or an SAE in the steering spec)")
        sae = load_sae_cached(sae_path, cache)
        kw.update(sae=sae, sae_path=str(Path(sae_path).expanduser().resolve()), top_m=cfg.top_m)
    gate = make_gate(cfg.gate, layer, P, **kw)
    meta: dict[str, Any] = {"fpr": cfg.fpr, "positions": P}
    pol = Policy(gate=gate, steering=list(cfg.steering), name=cfg.name or cfg.gate, model=models.model_name(model),
                 meta=meta, gate_model=gated_model, gate_suffix=cfg.gate_suffix or None, gate_suffix_ids=suffix_ids,
                 template_ids=template_ids(tok, post_instruction_positions(tok)) if cfg.chat_only else None)
    pol.check(model, ivs)
    if cfg.gate == "always":
        return pol

    memo = residuals if residuals is not None else {}

    def inputs(prompts: list[Any], desc: str) -> torch.Tensor:
        key = gate_inputs_key(models.model_name(reader), layer, P, prompts, suffix_ids)
        if key in memo:
            return memo[key]
        f = gate_inputs_file(cfg.cache, key) if cfg.cache else None
        if f is not None and f.exists():
            from safetensors.torch import load_file

            memo[key] = load_file(str(f))["h"]
        else:
            memo[key] = collect_gate_inputs(reader, tok, prompts, layer, P, cfg.batch_size, progress, desc,
                                            suffix_ids=suffix_ids)
            if f is not None:
                from safetensors.torch import save

                atomic_write_bytes(f, save({"h": memo[key].contiguous()}))
        return memo[key]

    th, ts, used = labelled_prompts(cfg.train, cfg.limit, cfg.seed, "train")
    ensure(len(th) >= 2 and len(ts) >= 2, "train sets need >= 2 harmful and >= 2 harmless prompts")
    weights = {}
    if any(u["weight"] != 1.0 for u in used):
        ensure(cfg.gate == "probe", f"per-set weights (@W) apply to probe gates only, not {cfg.gate!r}")
        for lab in ("harmful", "harmless"):
            weights[f"{lab}_weight"] = torch.cat([torch.full((u[f"n_{lab}"],), u["weight"]) for u in used])
    gate.fit(inputs(th, "gate train harmful"), inputs(ts, "gate train harmless"), **weights)
    meta["train"] = {"sets": [{k: v for k, v in u.items() if k != "keys"} for u in used], "n_harmful": len(th),
                     "n_harmless": len(ts)}
    vh, vs, vused = labelled_prompts(cfg.val, cfg.limit, cfg.seed, "val")
    ensure(len(vs) > 0, "validation sets hold no harmless prompts: the FPR cap needs benign scores")
    ensure(cfg.fpr_cap in ("pooled", "per-set"), f"fpr_cap must be pooled or per-set, got {cfg.fpr_cap!r}")
    hs = gate.score(inputs(vh, "gate val harmful")) if vh else None
    bs = gate.score(inputs(vs, "gate val harmless"))
    sets = _per_set(vused, "harmless", bs) if cfg.fpr_cap == "per-set" else None
    meta["val"] = {"sets": [{k: v for k, v in u.items() if k != "keys"} for u in vused],
                   **gate.calibrate(bs, hs, cfg.fpr, benign_sets=sets)}
    meta["used_prompts"] = sorted({k for u in used + vused for k in u["keys"]})
    meta["heldout"] = {}
    seen = set(meta["used_prompts"])
    for spec in cfg.heldout:
        items = [it for it in load_slice(spec, limit=cfg.limit, seed=cfg.seed)
                 if text_key(it.messages or it.prompt) not in seen]
        ensure(len(items) > 0, f"held-out set {spec!r} is empty (after leaving out the prompts used for fitting)")
        _, fired, _ = gate.decide(inputs([it.messages or it.prompt for it in items], f"gate {spec}"))
        labels = sorted({str(it.label) for it in items})
        for lab in labels:  # a mixed set (xstest) gets one fire rate per label: TPR on harmful, FPR on harmless
            sel = [i for i, it in enumerate(items) if str(it.label) == lab]
            name = spec if len(labels) == 1 else f"{spec}[{lab}]"
            meta["heldout"][name] = rate_summary(int(fired[sel].sum()), len(sel))
    return pol

"""Gates: decide per prompt whether (and how strongly) to steer, from the residual at the post-instruction positions.

A gate reads the residual stream after one decoder layer at the last ``positions`` prompt tokens: with left padding
and a chat template these are the template tokens after the user message (``<|im_end|>\\n<|im_start|>assistant\\n``
for ChatML), where Arditi et al. find the harmful/harmless distinction most linearly readable. The input of every
gate is a ``[n, P, d]`` tensor of those residuals (P = ``positions``); ``reduce`` pools the P positions (``mean`` or
``last``). Scores are "higher = more harmful"; a row *fires* when ``score > threshold``.

Gates:

* :class:`SAEFeatureGate` — the top-m SAE latents by ``|AUROC - 0.5|`` (harmful vs harmless, train split), combined
  by a logistic regression on their (pooled, standardised) activations; score = the logit.
* :class:`ProbeGate` — a logistic regression on the (pooled, standardised) residual; score = the logit.
* :class:`CastGate` — a CAST-style condition vector (normalised difference of means, Lee et al. 2024); score = the
  cosine similarity between the pooled residual (centred at the midpoint of the two means) and that vector.
* :class:`AlwaysGate` — fires on every row with strength 1 (the paper's unconditional steering as a policy).

Thresholds come from :func:`choose_threshold` on *benign validation* scores: the smallest threshold whose false
positive rate on those scores is at most the requested level. Strength given a decision (``strength``):
``hard`` = 1 when fired; ``linear`` = ``min(1, (s - t) / ramp)``; ``sigmoid`` = ``tanh((s - t) / ramp)`` (a smooth
ramp that is 0 at the threshold). Rows that do not fire always get strength exactly 0.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from saesteer.core import SaesteerError, auroc, ensure, standardise_fit

STRENGTH_MODES = ("hard", "linear", "sigmoid")
REDUCE_MODES = ("mean", "last")


# --------------------------------------------------------------------------------------------- thresholds
def choose_threshold(benign_scores: Sequence[float] | torch.Tensor, fpr: float = 0.02) -> float:
    """The smallest threshold ``t`` with ``mean(benign_scores > t) <= fpr``.

    With the benign scores sorted in decreasing order s(1) >= s(2) >= ..., at most ``k = floor(fpr * n)`` of them may
    exceed ``t``; ``t = s(k+1)`` admits exactly the values strictly above it (≤ k, fewer with ties) and any smaller
    ``t`` would admit s(k+1) too, so it is the tightest. ``fpr >= 1`` → ``-inf`` (everything fires).
    """
    s = torch.as_tensor(benign_scores, dtype=torch.float64).flatten()
    ensure(s.numel() > 0, "cannot choose a threshold: no benign validation scores")
    ensure(bool(torch.isfinite(s).all()), "cannot choose a threshold: benign scores contain NaN or inf")
    ensure(0.0 <= fpr <= 1.0 and not math.isnan(fpr), f"false-positive rate must be in [0, 1], got {fpr}")
    n = s.numel()
    k = math.floor(fpr * n + 1e-9)
    if k >= n:
        return float("-inf")
    return float(torch.sort(s, descending=True).values[k])


def choose_low_threshold(harmful_scores: Sequence[float] | torch.Tensor, rate: float = 0.02) -> float:
    """The largest threshold ``t`` with ``mean(harmful_scores < t) <= rate``: the low side of a two-sided policy
    fires *below* ``t``, and at most ``rate`` of the harmful validation prompts may be steered there. The mirror of
    :func:`choose_threshold` (``-choose_threshold(-scores, rate)``); ``rate >= 1`` → ``inf``."""
    return -choose_threshold(-torch.as_tensor(harmful_scores, dtype=torch.float64), rate)


def choose_threshold_per_set(benign_sets: Sequence[Sequence[float] | torch.Tensor], fpr: float = 0.02) -> float:
    """The smallest threshold whose false-positive rate is ``<= fpr`` on *every* benign set (the largest of the
    per-set :func:`choose_threshold` values): a pooled cap lets a large easy set hide a small hard one."""
    ensure(len(benign_sets) > 0, "cannot choose a threshold: no benign validation sets")
    return max(choose_threshold(b, fpr) for b in benign_sets)


def strength_from_scores(scores: torch.Tensor, threshold: float, mode: str = "hard", ramp: float = 1.0) -> torch.Tensor:
    """Per-row steering strength in [0, 1] (0 exactly for rows with ``score <= threshold``)."""
    ensure(mode in STRENGTH_MODES, f"unknown strength mode {mode!r} (choose from {', '.join(STRENGTH_MODES)})")
    fired = scores > threshold
    if mode == "hard":
        return fired.to(scores.dtype)
    ensure(ramp > 0 and math.isfinite(ramp), f"strength ramp must be a positive number, got {ramp}")
    margin = (scores - threshold).clamp_min(0) / ramp
    if math.isinf(threshold):  # everything fires; no margin to ramp over
        margin = torch.ones_like(scores)
    out = margin.clamp_max(1.0) if mode == "linear" else torch.tanh(margin)
    return torch.where(fired, out, torch.zeros_like(out))


# --------------------------------------------------------------------------------------------- gates
class Gate:
    """Base class: pooling, threshold, strength and (de)serialisation. Subclasses define fit/score/tensors."""

    kind = "base"
    tensor_names: tuple[str, ...] = ()

    def __init__(self, layer: int, positions: int = 1, reduce: str = "mean", threshold: float = float("-inf"),
                 strength: str = "hard", ramp: float = 1.0) -> None:
        ensure(reduce in REDUCE_MODES, f"unknown gate reduce {reduce!r} (choose from {', '.join(REDUCE_MODES)})")
        ensure(strength in STRENGTH_MODES, f"unknown strength mode {strength!r} (choose from {', '.join(STRENGTH_MODES)})")
        ensure(int(positions) >= 1, f"gate positions must be >= 1, got {positions}")
        ensure(not math.isnan(float(threshold)), "gate threshold is NaN")
        self.layer, self.positions, self.reduce = int(layer), int(positions), reduce
        self.threshold, self.strength, self.ramp = float(threshold), strength, float(ramp)
        self.fitted = False

    # pooling -------------------------------------------------------------------------------------------------------
    def _check(self, h: torch.Tensor, d: int | None = None) -> torch.Tensor:
        ensure(h.dim() == 3, f"gate input must be [n, positions, d], got shape {tuple(h.shape)}")
        ensure(h.shape[1] >= self.positions, f"gate needs {self.positions} positions, got {h.shape[1]}")
        if d is not None:
            ensure(h.shape[-1] == d, f"gate was fitted on width {d}, got residuals of width {h.shape[-1]}")
        return h[:, -self.positions:].float()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, P, m] -> [n, m]`` by the gate's ``reduce``."""
        return x[:, -1] if self.reduce == "last" else x.mean(1)

    # interface -----------------------------------------------------------------------------------------------------
    def fit(self, harmful: torch.Tensor, harmless: torch.Tensor) -> "Gate":
        raise NotImplementedError

    def score(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def calibrate(self, benign_scores: torch.Tensor, harmful_scores: torch.Tensor | None = None,
                  fpr: float = 0.02, benign_sets: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Set the threshold on benign validation scores (FPR cap) and the strength ramp; return the val stats.

        With ``benign_sets`` (name -> scores) the cap holds on each set separately (:func:`choose_threshold_per_set`)
        and the stats report each set's FPR; ``benign_scores`` is then ignored for the threshold."""
        if benign_sets:
            self.threshold = choose_threshold_per_set(list(benign_sets.values()), fpr)
        else:
            self.threshold = choose_threshold(benign_scores, fpr)
        b = torch.as_tensor(benign_scores, dtype=torch.float64)
        stats: dict[str, Any] = {"threshold": self.threshold, "target_fpr": fpr, "cap": "per-set" if benign_sets else
                                 "pooled", "val_fpr": float((b > self.threshold).double().mean()),
                                 "val_benign_n": int(b.numel())}
        if benign_sets:
            stats["val_fpr_per_set"] = {k: float((torch.as_tensor(v, dtype=torch.float64) > self.threshold)
                                                 .double().mean()) for k, v in benign_sets.items()}
        if harmful_scores is not None and len(harmful_scores):
            hs = torch.as_tensor(harmful_scores, dtype=torch.float64)
            stats.update(val_tpr=float((hs > self.threshold).double().mean()), val_harmful_n=int(hs.numel()))
            med = float(hs.median())
            if math.isfinite(self.threshold) and med > self.threshold:
                self.ramp = med - self.threshold  # the median harmful prompt gets full strength (linear)
        return stats

    def decide(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scores, fired, strength)`` for residuals ``[n, P, d]``."""
        return self.decide_scores(self.score(h))

    def decide_scores(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scores, fired, strength)`` for scores already computed (e.g. the per-turn maximum of a policy)."""
        ensure(bool(torch.isfinite(s).all()), "gate produced NaN/inf scores (non-finite residuals?)")
        return s, s > self.threshold, strength_from_scores(s, self.threshold, self.strength, self.ramp)

    def header(self) -> dict[str, Any]:
        thr = self.threshold
        return {"kind": self.kind, "layer": self.layer, "positions": self.positions, "reduce": self.reduce,
                "threshold": thr if math.isfinite(thr) else ("-inf" if thr < 0 else "inf"),
                "strength": self.strength, "ramp": self.ramp, **self.extra_header()}

    def extra_header(self) -> dict[str, Any]:
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n).detach().contiguous() for n in self.tensor_names}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for n in self.tensor_names:
            ensure(n in tensors, f"{self.kind} gate: tensor {n!r} missing from the policy file")
            t = tensors[n].float()
            ensure(bool(torch.isfinite(t).all()), f"{self.kind} gate: tensor {n!r} contains NaN/inf")
            setattr(self, n, t)
        self.fitted = True

    @property
    def d_in(self) -> int | None:
        return None


class AlwaysGate(Gate):
    """Fires on every row with full strength: unconditional steering expressed as a policy."""

    kind = "always"

    def __init__(self, layer: int = 0, positions: int = 1, **kw: Any) -> None:
        kw.setdefault("threshold", float("-inf"))
        super().__init__(layer, positions, **kw)
        self.fitted = True

    def fit(self, harmful: torch.Tensor, harmless: torch.Tensor) -> "Gate":
        return self

    def score(self, h: torch.Tensor) -> torch.Tensor:
        return torch.ones(h.shape[0])

    def decide(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = h.shape[0]
        return torch.ones(n), torch.ones(n, dtype=torch.bool), torch.ones(n)


def _logistic(x: torch.Tensor, y: torch.Tensor, C: float, seed: int = 0,
              weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.linear_model import LogisticRegression

    ensure(len(set(y.tolist())) == 2, "gate fitting needs both harmful and harmless examples")
    clf = LogisticRegression(C=C, max_iter=2000, random_state=seed)
    clf.fit(x.double().numpy(), y.numpy(), sample_weight=None if weight is None else weight.double().numpy())
    return torch.from_numpy(clf.coef_[0]).float(), torch.tensor(float(clf.intercept_[0]))


def _check_fit_inputs(harmful: torch.Tensor, harmless: torch.Tensor) -> None:
    ensure(harmful.dim() == 3 and harmless.dim() == 3, "gate fitting expects [n, positions, d] residuals")
    ensure(harmful.shape[0] >= 2 and harmless.shape[0] >= 2, "gate fitting needs >= 2 harmful and >= 2 harmless prompts")
    ensure(harmful.shape[2] == harmless.shape[2], "harmful and harmless residuals differ in width")
    ensure(bool(torch.isfinite(harmful).all() and torch.isfinite(harmless).all()), "gate training residuals contain NaN/inf")


class ProbeGate(Gate):
    """Logistic-regression probe on the pooled residual (standardised with train statistics)."""

    kind = "probe"
    tensor_names = ("mean", "std", "coef", "intercept")

    def __init__(self, layer: int, positions: int = 1, C: float = 0.1, **kw: Any) -> None:
        super().__init__(layer, positions, **kw)
        self.C = float(C)

    def extra_header(self) -> dict[str, Any]:
        return {"C": self.C}

    def fit(self, harmful: torch.Tensor, harmless: torch.Tensor, harmful_weight: torch.Tensor | None = None,
            harmless_weight: torch.Tensor | None = None) -> "Gate":
        """Fit on ``[n, P, d]`` residuals; optional per-prompt weights (e.g. up-weighting benign look-alikes)."""
        _check_fit_inputs(harmful, harmless)
        x = torch.cat([self.pool(self._check(harmful)), self.pool(self._check(harmless))])
        y = torch.cat([torch.ones(harmful.shape[0]), torch.zeros(harmless.shape[0])]).long()
        w = None
        if harmful_weight is not None or harmless_weight is not None:
            hw = torch.ones(harmful.shape[0]) if harmful_weight is None else torch.as_tensor(harmful_weight).float()
            sw = torch.ones(harmless.shape[0]) if harmless_weight is None else torch.as_tensor(harmless_weight).float()
            ensure(hw.shape == (harmful.shape[0],) and sw.shape == (harmless.shape[0],),
                   "gate sample weights need one value per prompt")
            w = torch.cat([hw, sw])
            ensure(bool(torch.isfinite(w).all() and (w >= 0).all() and (w > 0).any()),
                   "gate sample weights must be finite, non-negative and not all zero")
        self.mean, self.std = standardise_fit(x)
        self.coef, self.intercept = _logistic((x - self.mean) / self.std, y, self.C, weight=w)
        self.fitted = True
        return self

    def score(self, h: torch.Tensor) -> torch.Tensor:
        ensure(self.fitted, "probe gate is not fitted")
        x = self.pool(self._check(h, self.mean.shape[0]))
        return ((x - self.mean) / self.std) @ self.coef + self.intercept

    @property
    def d_in(self) -> int | None:
        return int(self.mean.shape[0]) if self.fitted else None


class CastGate(Gate):
    """CAST-style condition vector: cosine between the centred pooled residual and the unit mean difference."""

    kind = "cast"
    tensor_names = ("direction", "center")

    def fit(self, harmful: torch.Tensor, harmless: torch.Tensor) -> "Gate":
        _check_fit_inputs(harmful, harmless)
        mh, mb = self.pool(self._check(harmful)).mean(0), self.pool(self._check(harmless)).mean(0)
        diff = mh - mb
        ensure(float(diff.norm()) > 0, "harmful and harmless residual means coincide: no condition vector")
        self.direction, self.center = diff / diff.norm(), (mh + mb) / 2
        self.fitted = True
        return self

    def score(self, h: torch.Tensor) -> torch.Tensor:
        ensure(self.fitted, "cast gate is not fitted")
        x = self.pool(self._check(h, self.direction.shape[0])) - self.center
        return torch.nn.functional.cosine_similarity(x, self.direction[None], dim=-1)

    @property
    def d_in(self) -> int | None:
        return int(self.direction.shape[0]) if self.fitted else None


class SAEFeatureGate(Gate):
    """Top-m SAE latents (by |AUROC - 0.5| on the train split) combined by a logistic regression.

    Latent activations are ``sae.encode_dense`` (the SAE's own top-k activations) at each position, then pooled. The
    SAE itself is not stored in the policy (its path is, in ``sae_path``); :meth:`attach` gives the gate its SAE.
    """

    kind = "sae"
    tensor_names = ("features", "mean", "std", "coef", "intercept", "auroc")

    def __init__(self, layer: int, positions: int = 1, sae: Any = None, sae_path: str | None = None, top_m: int = 16,
                 C: float = 1.0, **kw: Any) -> None:
        super().__init__(layer, positions, **kw)
        ensure(int(top_m) >= 1, f"top_m must be >= 1, got {top_m}")
        self.sae, self.sae_path, self.top_m, self.C = sae, sae_path, int(top_m), float(C)

    def attach(self, sae: Any) -> "SAEFeatureGate":
        n_lat = int(sae.W_enc.shape[0])
        if self.fitted:
            ensure(int(self.features.max()) < n_lat, f"sae gate uses latent {int(self.features.max())} but the SAE has {n_lat}")
        self.sae = sae
        return self

    def extra_header(self) -> dict[str, Any]:
        return {"sae_path": self.sae_path, "top_m": self.top_m, "C": self.C}

    def latents(self, h: torch.Tensor) -> torch.Tensor:
        """Pooled dense latent activations ``[n, num_latents]``."""
        ensure(self.sae is not None, "sae gate has no SAE attached")
        d = int(self.sae.W_enc.shape[1])
        x = self._check(h, d)
        with torch.no_grad():
            return self.pool(self.sae.encode_dense(x.to(self.sae.W_enc.dtype)).float())

    def fit(self, harmful: torch.Tensor, harmless: torch.Tensor) -> "Gate":
        _check_fit_inputs(harmful, harmless)
        ah, ab = self.latents(harmful), self.latents(harmless)
        auc = auroc(ah, ab)
        m = min(self.top_m, auc.numel())
        self.features = torch.argsort((auc - 0.5).abs(), descending=True, stable=True)[:m]
        self.auroc = auc[self.features].float()
        x = torch.cat([ah, ab])[:, self.features]
        y = torch.cat([torch.ones(ah.shape[0]), torch.zeros(ab.shape[0])]).long()
        self.mean, self.std = standardise_fit(x)
        self.coef, self.intercept = _logistic((x - self.mean) / self.std, y, self.C)
        self.fitted = True
        return self

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_tensors(tensors)
        self.features = self.features.long()

    def score(self, h: torch.Tensor) -> torch.Tensor:
        ensure(self.fitted, "sae gate is not fitted")
        x = self.latents(h)[:, self.features]
        return ((x - self.mean) / self.std) @ self.coef + self.intercept

    @property
    def d_in(self) -> int | None:
        return int(self.sae.W_enc.shape[1]) if self.sae is not None else None


GATES: dict[str, type[Gate]] = {g.kind: g for g in (AlwaysGate, ProbeGate, CastGate, SAEFeatureGate)}


def make_gate(kind: str, layer: int, positions: int = 1, **kw: Any) -> Gate:
    ensure(kind in GATES, f"unknown gate kind {kind!r} (choose from {', '.join(GATES)})")
    return GATES[kind](layer, positions, **kw)


def gate_from_header(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Gate:
    """Rebuild a gate from its saved header and tensors (SAE gates still need :meth:`SAEFeatureGate.attach`)."""
    try:
        kind = header["kind"]
        ensure(kind in GATES, f"unknown gate kind {kind!r} in policy (known: {', '.join(GATES)})")
        thr = header["threshold"]
        thr = float(thr) if not isinstance(thr, str) else float(thr.replace("inf", "Infinity"))
        kw: dict[str, Any] = dict(reduce=header["reduce"], threshold=thr, strength=header["strength"],
                                  ramp=float(header["ramp"]))
        for k in ("C", "top_m", "sae_path"):
            if k in header:
                kw[k] = header[k]
        gate = GATES[kind](int(header["layer"]), int(header["positions"]), **kw)
    except (KeyError, TypeError, ValueError) as e:
        raise SaesteerError(f"malformed gate in policy: {type(e).__name__}: {e}") from None
    if kind != "always":
        gate.load_tensors(tensors)
    return gate


# --------------------------------------------------------------------------------------------- residual collection
def post_instruction_positions(tok: Any) -> int:
    """How many tokens the chat template puts after the user message (``<|im_end|>\\n<|im_start|>assistant\\n`` → 5)."""
    from saesteer.steering import post_instruction_len

    return post_instruction_len(tok)


@torch.no_grad()
def collect_gate_inputs(model: Any, tok: Any, prompts: Sequence[Any], layer: int, positions: int,
                        batch_size: int = 16, progress: bool = True, desc: str = "gate inputs",
                        suffix_ids: Sequence[int] | None = None, system_prefix: str | None = None) -> torch.Tensor:
    """Residuals ``[n, positions, d]`` after ``layer`` at the last ``positions`` tokens of each chat-formatted prompt.

    Prompts are strings or message lists (chat template applied, generation prompt added) — the same text the
    policy hook sees at prefill — or lists of token ids, read as they are (a windows read's views,
    ``gating.windows``). Left padding keeps the last positions real tokens. ``suffix_ids`` are appended to
    every prompt's ids (a policy's ``gate_suffix``), as the policy's lookahead does; ``system_prefix`` (a policy's
    system prompt) is formatted in as generation under the policy does.
    """
    from saesteer.models import check_layer, format_chat, run_to_layer

    check_layer(model, layer)
    ensure(len(prompts) > 0, f"no prompts to collect {desc} from")
    def is_ids(p: Any) -> bool:
        return isinstance(p, (list, tuple)) and len(p) > 0 and all(isinstance(i, int) for i in p)

    texts = [p if is_ids(p) else format_chat(tok, p, system_prefix=system_prefix) for p in prompts]
    suffix = [int(i) for i in suffix_ids or ()]
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    from saesteer.core import progress_bar

    with progress_bar(len(texts), desc, unit="prompt", enabled=progress) as bar:
        for i in range(0, len(texts), batch_size):
            part = texts[i:i + batch_size]
            strs = [t for t in part if isinstance(t, str)]
            enc_strs = iter(tok(strs, add_special_tokens=False)["input_ids"] if strs else [])
            ids = [list(t if not isinstance(t, str) else next(enc_strs)) + suffix for t in part]
            enc = tok.pad({"input_ids": ids}, return_tensors="pt")
            ensure(enc["input_ids"].shape[1] >= positions, f"prompts shorter than the {positions} gate positions")
            h = run_to_layer(model, enc["input_ids"].to(device), enc["attention_mask"].to(device), layer)
            out.append(h[:, -positions:].float().cpu())
            bar.update(len(ids), tokens=int(enc["attention_mask"].sum()))
    return torch.cat(out)

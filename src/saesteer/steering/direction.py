"""Refusal-direction baseline (Arditi et al. 2024, "Refusal in language models is mediated by a single direction").

``fit_direction`` takes the difference of mean residual activations between harmful and harmless prompts at the
post-instruction position(s) of the chat template (the tokens after the user's text, e.g.
``<|im_end|>\\n<|im_start|>assistant\\n`` in ChatML), at each candidate layer, and picks the layer on a validation
split with forward passes only:

* ``refusal score`` = log-odds that the first generated token is a refusal token (first tokens of "I'm sorry",
  "I cannot", "As an AI", ...), as in Arditi et al.;
* ``induce``: refusal score on harmless val prompts with ``Add(r_l, alpha)`` at layer l, minus the unsteered score;
* ``bypass``: unsteered refusal score on harmful val prompts minus the score with ``r_l`` ablated at every layer;
* the chosen layer maximises ``induce + bypass`` among layers below ``max_layer_frac`` of the depth.

Unlike Arditi et al. there is no KL filter on harmless prompts and the position is fixed (``last`` token or the
``mean`` over post-instruction tokens) rather than searched. The result is saved as safetensors (tensor ``vector``,
the raw difference of means, plus metadata) with a JSON sidecar holding every candidate's scores.
Steering uses the same interface as SAE steering: ``d.add(alpha)`` → :class:`~saesteer.steering.interventions.Add`,
``d.ablate()`` → :class:`~saesteer.steering.interventions.AblateDirection`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from saesteer import models
from saesteer.core import SaesteerError, atomic_write_bytes, atomic_write_json, ensure, progress_bar, read_json

from .hooks import steer
from .interventions import AblateDirection, Add

REFUSAL_PREFIXES = ("I'm sorry", "I am sorry", "I cannot", "I can't", "Sorry", "As an AI", "I apologize",
                    "Unfortunately", "I'm unable")
_SENTINEL = "\u2063SAESTEER_INSTRUCTION\u2063"


@dataclass
class DirectionConfig:
    """How to fit and select the refusal direction."""

    layers: list[int] | None = None
    """Candidate layers (None: every other layer from 25 % to 75 % of the depth)."""
    position: str = "last"
    """``last``: the last post-instruction token; ``mean``: mean over all post-instruction tokens."""
    alpha: float = 1.0
    """Coefficient of the activation addition used to score candidates (and the default for steering)."""
    max_layer_frac: float = 0.8
    """Only layers below this fraction of the depth may be chosen (Arditi et al.)."""
    batch_size: int = 8
    """Prompts per forward pass."""
    system: str | None = None
    """Optional system prompt for the chat template."""

    def __post_init__(self) -> None:
        ensure(self.position in ("last", "mean"), f"position must be last or mean, got {self.position!r}")
        ensure(self.batch_size > 0, "batch_size must be positive")
        ensure(math.isfinite(self.alpha), "alpha must be finite")


@dataclass
class RefusalDirection:
    """A difference-of-means direction at one layer (``vector`` in raw residual units, not normalised)."""

    vector: torch.Tensor
    layer: int
    model: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    @property
    def unit(self) -> torch.Tensor:
        return self.vector / self.vector.norm()

    def add(self, alpha: float = 1.0, layer: int | None = None, positions: str | None = None) -> Add:
        """Activation addition ``x + alpha * r`` at ``layer`` (default: the fitted layer)."""
        return Add(self.vector, alpha, layer=self.layer if layer is None else layer, positions=positions)

    def ablate(self, layer: int | None = None, positions: str | None = None) -> AblateDirection:
        """Directional ablation at every layer (``layer=None``) or one layer."""
        return AblateDirection(self.vector, layer=layer, positions=positions)


# --------------------------------------------------------------------------------------------- tokens and positions
def post_instruction_len(tok: Any, system: str | None = None) -> int:
    """Number of chat-template tokens after the user's instruction (the generation prompt included)."""
    text = models.format_chat(tok, _SENTINEL, system=system)
    ensure(_SENTINEL in text, "the chat template drops the instruction text")
    suffix = text[text.index(_SENTINEL) + len(_SENTINEL):]
    n = len(tok(suffix, add_special_tokens=False)["input_ids"])
    return max(n, 1)


def refusal_token_ids(tok: Any) -> list[int]:
    """First token of each refusal prefix (deduplicated)."""
    ids: list[int] = []
    for p in REFUSAL_PREFIXES:
        t = tok(p, add_special_tokens=False)["input_ids"]
        if t and t[0] not in ids:
            ids.append(int(t[0]))
    ensure(bool(ids), "cannot tokenize any refusal prefix")
    return ids


def _batches(model: nn.Module, tok: Any, prompts: Sequence[Any], batch_size: int, system: str | None):
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for i in range(0, len(prompts), batch_size):
        enc = [tok(models.format_chat(tok, p, system=system), add_special_tokens=False)["input_ids"]
               for p in prompts[i:i + batch_size]]
        n = max(len(e) for e in enc)
        ids = torch.full((len(enc), n), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), n), dtype=torch.long)
        for j, e in enumerate(enc):  # left padding: post-instruction tokens are the last positions of every row
            ids[j, n - len(e):] = torch.tensor(e)
            mask[j, n - len(e):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        yield ids.to(device), mask.to(device), pos.to(device)


class _Stop(Exception):
    pass


@torch.inference_mode()
def mean_activations(model: nn.Module, tok: Any, prompts: Sequence[Any], layers: Sequence[int], n_post: int,
                     batch_size: int = 8, system: str | None = None, progress: Any = None) -> torch.Tensor:
    """``[len(layers), n_post, d]``: mean residual after each layer at the last ``n_post`` positions."""
    ensure(len(prompts) > 0, "no prompts to average over")
    layers = [models.check_layer(model, L) for L in layers]
    sums = torch.zeros(len(layers), n_post, models.d_model(model), dtype=torch.float64)
    grabbed: dict[int, torch.Tensor] = {}
    last = max(layers)

    def make(L: int):
        def hook(_m, _i, out):
            grabbed[L] = models.layer_output(out)[:, -n_post:, :].double().sum(0).cpu()
            if L == last:
                raise _Stop

        return hook

    handles = [models.hook_module(model, L).register_forward_hook(make(L)) for L in sorted(set(layers))]
    body = getattr(model, getattr(model, "base_model_prefix", ""), model)
    try:
        for ids, mask, pos in _batches(model, tok, prompts, batch_size, system):
            try:
                body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
            except _Stop:
                pass
            for i, L in enumerate(layers):
                sums[i] += grabbed[L]
            if progress is not None:
                progress(len(ids))
    finally:
        for h in handles:
            h.remove()
    return (sums / len(prompts)).float()


@torch.inference_mode()
def refusal_scores(model: nn.Module, tok: Any, prompts: Sequence[Any], batch_size: int = 8,
                   system: str | None = None, refusal_ids: Sequence[int] | None = None) -> torch.Tensor:
    """Per prompt: log-odds that the first generated token is a refusal token (hooks on the model stay active)."""
    ids_ref = torch.as_tensor(list(refusal_ids or refusal_token_ids(tok)))
    out = []
    for ids, mask, pos in _batches(model, tok, prompts, batch_size, system):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                       logits_to_keep=1).logits[:, -1, :].float()
        ensure(bool(torch.isfinite(logits).all()), "the model produced NaN/inf logits")
        logp = torch.log_softmax(logits, -1)
        p_ref = logp[:, ids_ref.to(logp.device)].logsumexp(-1)
        p_other = torch.log1p(-p_ref.exp().clamp(max=1 - 1e-7))
        out.append((p_ref - p_other).cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------- fitting
def default_layers(n: int) -> list[int]:
    lo, hi = max(1, round(0.25 * n)), max(1, round(0.75 * n))
    return list(range(lo, hi + 1, 2)) or [n // 2]


def fit_direction(model: nn.Module, tok: Any, harmful: Sequence[Any], harmless: Sequence[Any],
                  harmful_val: Sequence[Any], harmless_val: Sequence[Any], cfg: DirectionConfig | None = None,
                  progress: bool = False) -> tuple[RefusalDirection, dict[str, Any]]:
    """Fit difference-of-means candidates and pick a layer on the val prompts; returns (direction, report)."""
    cfg = cfg or DirectionConfig()
    for name, xs in (("harmful", harmful), ("harmless", harmless), ("harmful val", harmful_val),
                     ("harmless val", harmless_val)):
        ensure(len(xs) > 0, f"no {name} prompts")
    n_layers = models.n_layers(model)
    layers = sorted({models.check_layer(model, L) for L in (cfg.layers or default_layers(n_layers))})
    allowed = [L for L in layers if L < cfg.max_layer_frac * n_layers]
    ensure(bool(allowed), f"no candidate layer below {cfg.max_layer_frac:.0%} of the {n_layers} layers: {layers}")
    n_post = post_instruction_len(tok, cfg.system)
    total = len(harmful) + len(harmless) + len(harmful_val) + len(harmless_val) * (1 + len(allowed))
    total += len(harmful_val) * len(allowed)
    with progress_bar(total, "refusal direction", unit="prompt", enabled=progress) as bar:
        adv = bar.update
        mu_h = mean_activations(model, tok, harmful, allowed, n_post, cfg.batch_size, cfg.system, adv)
        mu_s = mean_activations(model, tok, harmless, allowed, n_post, cfg.batch_size, cfg.system, adv)
        diff = mu_h - mu_s  # [layers, n_post, d]
        vecs = diff[:, -1, :] if cfg.position == "last" else diff.mean(1)
        ensure(bool(torch.isfinite(vecs).all()), "the difference of means is not finite")
        rid = refusal_token_ids(tok)
        kw = dict(batch_size=cfg.batch_size, system=cfg.system, refusal_ids=rid)
        base_harmful = float(refusal_scores(model, tok, harmful_val, **kw).mean())
        adv(len(harmful_val))
        base_harmless = float(refusal_scores(model, tok, harmless_val, **kw).mean())
        adv(len(harmless_val))
        cands = []
        for L, v in zip(allowed, vecs):
            with steer(model, Add(v, cfg.alpha, layer=L)):
                induced = float(refusal_scores(model, tok, harmless_val, **kw).mean())
            adv(len(harmless_val))
            with steer(model, AblateDirection(v)):
                ablated = float(refusal_scores(model, tok, harmful_val, **kw).mean())
            adv(len(harmful_val))
            cands.append({"layer": L, "norm": float(v.norm()), "induce": induced - base_harmless,
                          "bypass": base_harmful - ablated, "harmless_score_added": induced,
                          "harmful_score_ablated": ablated})
    for c in cands:
        c["score"] = c["induce"] + c["bypass"]
    best = max(range(len(cands)), key=lambda i: cands[i]["score"])
    meta = {
        "method": "difference of means (Arditi et al. 2024)",
        "position": cfg.position, "n_post_instruction_tokens": n_post, "alpha": cfg.alpha,
        "n_harmful": len(harmful), "n_harmless": len(harmless),
        "n_harmful_val": len(harmful_val), "n_harmless_val": len(harmless_val),
        "refusal_token_ids": rid, "baseline_harmful_score": base_harmful, "baseline_harmless_score": base_harmless,
        "candidates": cands, "config": asdict(cfg),
    }
    d = RefusalDirection(vector=vecs[best].clone(), layer=allowed[best], model=models.model_name(model), meta=meta)
    d.meta["norm"] = d.norm
    return d, meta


# --------------------------------------------------------------------------------------------- files
def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path).expanduser()
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    elif p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p, p.with_suffix(".json")


def save_direction(d: RefusalDirection, path: str | Path, data: dict[str, Any] | None = None) -> Path:
    """Write ``<path>.safetensors`` (tensor ``vector`` + metadata) and a ``.json`` sidecar, each atomically."""
    from safetensors.torch import save

    st, js = _paths(path)
    info = {"format": "saesteer-direction", "version": 1, "model": d.model, "layer": int(d.layer),
            "norm": d.norm, "d_model": int(d.vector.shape[0]), "data": data or {}, **{"meta": d.meta}}
    atomic_write_bytes(st, save({"vector": d.vector.detach().float().cpu().contiguous()},
                                metadata={"saesteer": json.dumps({k: v for k, v in info.items() if k != "meta"})}))
    atomic_write_json(js, info)
    return st


def load_direction(path: str | Path) -> RefusalDirection:
    """Read a direction file (the ``.safetensors`` or its ``.json`` sidecar path)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st, js = _paths(path)
    ensure(st.exists(), f"direction file not found: {st}")
    try:
        tensors = load_file(str(st))
    except (SafetensorError, OSError) as e:
        raise SaesteerError(f"cannot read direction file {st}: {e}") from None
    ensure("vector" in tensors, f"{st} has no 'vector' tensor")
    v = tensors["vector"].float()
    ensure(v.ndim == 1 and bool(torch.isfinite(v).all()) and float(v.norm()) > 0,
           f"{st}: the direction must be a finite, non-zero 1-D vector")
    from safetensors import safe_open

    with safe_open(str(st), "pt") as f:
        head = json.loads((f.metadata() or {}).get("saesteer", "{}"))
    info = read_json(js, "direction sidecar") if js.exists() else head
    ensure("layer" in info, f"{st}: no layer in its metadata")
    return RefusalDirection(vector=v, layer=int(info["layer"]), model=str(info.get("model", "")),
                            meta=dict(info.get("meta", {})))

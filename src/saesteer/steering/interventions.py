"""Steering interventions as forward hooks on the residual stream, usable around any HF causal LM.

``with steer(model, [Clamp(sae, [981], [5.0])]): model.generate(...)`` edits the output of decoder layer
``sae.cfg.layer`` (``models.hook_module``) on every forward, KV-cache decoding included, and removes its hooks on exit
(also on exceptions).

Conventions (all in the model's *raw* residual units):

* An SAE latent edit changes only the part of the residual the SAE attributes to that latent and keeps the SAE's
  error term: ``x' = x + (a_new - a_f(x)) * u_f``. ``a_f(x)`` is the latent's activation in the SAE's own encoding
  (``sae.latent_acts``: for Top-k 0 when the latent is not among the k active ones, for JumpReLU its thresholded
  value), and ``u_f = decode(e_f) - decode(0)`` is what one
  latent unit adds to the SAE's reconstruction. Clamp values are therefore in the SAE's own latent units (the units
  ``sae.encode`` reports and feature cards show), whatever input scaling the SAE folds in.
  ``Clamp``: ``a_new = c``; ``Scale``: ``a_new = factor * a_f``; ``AblateFeature``: ``a_new = 0``.
* ``Add``: ``x' = x + alpha * v`` (``v`` a raw vector, or ``u_f`` of an SAE latent, so ``alpha`` is in latent units).
* ``AblateDirection``: ``x' = x - (x . r) r`` with ``r`` unit-norm, at one layer or (``layer=None``) at the
  embedding output and after every decoder layer (Arditi et al.'s directional ablation on the residual stream).

Positions: ``"all"``; ``"prompt"`` edits only the prefill forward (positions before the first generated token);
``"generated"`` edits only positions past the prompt, i.e. decode steps with a KV cache. The prompt length is the
length of the last forward that started with an empty cache. Without a KV cache every forward is a fresh prefill,
so ``"generated"`` never fires there and ``"prompt"`` always does.

Per-row strength: every intervention has ``row_scale`` (``None`` = 1 for every row, or a ``[batch]`` tensor that
multiplies its edit per row, 0 = leave that row untouched); ``set_row_scale`` sets it and ``select_rows(index)``
keeps the rows that remain when a generation loop drops finished rows (module-level :func:`select_rows`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from saesteer import models
from saesteer.core import SaesteerError, ensure

POSITIONS = ("all", "prompt", "generated")
KINDS = ("clamp", "add", "scale", "ablate_feature", "ablate_direction")


# --------------------------------------------------------------------------------------------- SAE helpers
def sae_num_latents(sae: Any) -> int:
    cfg = getattr(sae, "cfg", None)
    n = getattr(cfg, "num_latents", None)
    return int(n) if n is not None else int(sae.W_dec.shape[0])


def sae_d_in(sae: Any) -> int:
    cfg = getattr(sae, "cfg", None)
    d = getattr(cfg, "d_in", None)
    return int(d) if d is not None else int(sae.W_dec.shape[1])


def sae_layer(sae: Any) -> int | None:
    """The layer an SAE was trained on (None when it does not record one; our SAEConfig uses -1)."""
    layer = getattr(getattr(sae, "cfg", None), "layer", None)
    return None if layer is None or int(layer) < 0 else int(layer)


def _sae_param(sae: Any) -> torch.Tensor:
    return sae.W_dec


@torch.no_grad()
def latent_vectors(sae: Any, features: Sequence[int]) -> torch.Tensor:
    """``[m, d_in]``: the raw-residual change one unit of each latent makes to the SAE's reconstruction."""
    idx = torch.as_tensor(list(features), dtype=torch.long, device=_sae_param(sae).device).unsqueeze(1)
    ones = torch.ones(idx.shape, dtype=_sae_param(sae).dtype, device=idx.device)
    return sae.decode(ones, idx) - sae.decode(torch.zeros_like(ones), idx)


def _check_features(sae: Any, features: Sequence[int]) -> list[int]:
    feats = [int(f) for f in features]
    ensure(len(feats) > 0, "no SAE feature given")
    n = sae_num_latents(sae)
    for f in feats:
        ensure(0 <= f < n, f"feature index {f} is out of range: the SAE has {n} latents (0..{n - 1})")
    ensure(len(set(feats)) == len(feats), f"duplicate feature indices in {feats}")
    return feats


def _finite(x: float, what: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise SaesteerError(f"{what} must be a number, got {x!r}") from None
    ensure(math.isfinite(v), f"{what} must be finite, got {v}")
    return v


def check_sae_compatible(sae: Any, model: nn.Module, layer: int) -> None:
    """SAE width / layer / model must match the model it steers (``formats.check_compatible`` when available)."""
    try:
        from saesteer.sae import check_compatible
    except ImportError:
        check_compatible = None
    if check_compatible is not None:
        check_compatible(sae, model, layer)
        return
    d = models.d_model(model)
    ensure(sae_d_in(sae) == d, f"SAE width mismatch: the SAE reads d_in={sae_d_in(sae)}, the model's residual is {d}")
    sl = sae_layer(sae)
    ensure(sl is None or sl == layer, f"the SAE was trained on layer {sl}, but steering asked for layer {layer}")
    sm = getattr(getattr(sae, "cfg", None), "model", None)
    mm = models.model_name(model)
    ensure(not sm or sm == mm, f"the SAE was trained on model {sm!r}, not on {mm!r}")


# --------------------------------------------------------------------------------------------- interventions
@dataclass(eq=False, kw_only=True)
class Intervention:
    """Base class: an edit of the residual stream after decoder layer ``layer``."""

    layer: int | None = None
    positions: str | None = None
    """``all`` / ``prompt`` / ``generated``; None: the default of :func:`steer`."""
    row_scale: torch.Tensor | None = field(default=None, repr=False)
    """``[batch]`` per-row multiplier of the edit (None: 1 for every row)."""

    def set_row_scale(self, scale: torch.Tensor | Sequence[float] | None) -> None:
        if scale is None:
            self.row_scale = None
            return
        t = torch.as_tensor(scale, dtype=torch.float32).flatten()
        ensure(bool(torch.isfinite(t).all()), "row scale contains NaN or inf")
        self.row_scale = t

    def select_rows(self, index: torch.Tensor) -> None:
        if self.row_scale is not None:
            self.row_scale = self.row_scale[torch.as_tensor(index, dtype=torch.long, device=self.row_scale.device)]

    def layers(self, model: nn.Module) -> list[int]:
        ensure(self.layer is not None, f"{type(self).__name__} needs a layer (the SAE does not record one: pass layer=)")
        return [models.check_layer(model, int(self.layer))]

    def prepare(self, model: nn.Module) -> None:
        """Validate against ``model`` and move tensors to its device (called by :func:`steer`)."""

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """The edit to add to ``h`` [batch, seq, d] (before masking and row scaling)."""
        raise NotImplementedError

    def apply(self, h: torch.Tensor, pos_mask: torch.Tensor | None) -> torch.Tensor:
        """``h`` plus the masked, row-scaled edit. ``pos_mask`` [seq] bool (CPU) or None (= every position)."""
        if pos_mask is not None and not bool(pos_mask.any()):
            return h
        d = self.delta(h)
        if pos_mask is not None and not bool(pos_mask.all()):
            d = d * pos_mask.to(device=d.device, dtype=d.dtype)[None, :, None]
        if self.row_scale is not None:
            ensure(
                self.row_scale.shape[0] == h.shape[0],
                f"row scale has {self.row_scale.shape[0]} rows but the batch has {h.shape[0]}",
            )
            d = d * self.row_scale.to(device=d.device, dtype=d.dtype)[:, None, None]
        return h + d.to(h.dtype)


@dataclass(eq=False)
class _LatentEdit(Intervention):
    """Edit SAE latents with the error term kept: ``x + (a_new - a_f(x)) * u_f`` for each feature f."""

    sae: Any = None
    features: Sequence[int] = ()

    def __post_init__(self) -> None:
        ensure(self.sae is not None, f"{type(self).__name__} needs an SAE")
        if isinstance(self.features, int):
            self.features = [self.features]
        self.features = _check_features(self.sae, self.features)
        if self.layer is None:
            self.layer = sae_layer(self.sae)
        self._vecs: torch.Tensor | None = None
        self._feat_t: torch.Tensor | None = None

    def prepare(self, model: nn.Module) -> None:
        layer = self.layers(model)[0]
        check_sae_compatible(self.sae, model, layer)
        dev = next(model.parameters()).device
        w = _sae_param(self.sae)
        if w.device != dev or w.dtype != torch.float32:  # SAE and clamp math in fp32 whatever the model's dtype
            self.sae.to(device=dev, dtype=torch.float32)
        self._vecs = latent_vectors(self.sae, self.features)
        self._feat_t = torch.as_tensor(self.features, dtype=torch.long, device=dev)

    def current(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., m]`` activations of the edited features (0 where inactive): the SAE's ``latent_acts`` (any
        architecture; JumpReLU: the thresholded value), else its top-k encoding."""
        if hasattr(self.sae, "latent_acts"):
            return self.sae.latent_acts(h, self._feat_t).to(h.dtype)
        top_acts, top_idx = self.sae.encode(h)
        match = top_idx.unsqueeze(-2) == self._feat_t[:, None]  # [..., m, k]
        return (top_acts.unsqueeze(-2) * match.to(top_acts.dtype)).sum(-1)

    def target(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        if self._vecs is None:
            raise SaesteerError(f"{type(self).__name__} used outside steer(): call steer(model, [...])")
        x = h.to(self._vecs.dtype)
        a = self.current(x)
        return (self.target(a) - a) @ self._vecs


@dataclass(eq=False)
class Clamp(_LatentEdit):
    """Set SAE latents to fixed values (latent units) at every steered position, error term kept."""

    values: Sequence[float] | float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        vals = [self.values] if isinstance(self.values, (int, float)) else list(self.values)
        if len(vals) == 1 and len(self.features) > 1:
            vals = vals * len(self.features)
        ensure(len(vals) == len(self.features), f"{len(self.features)} features but {len(vals)} clamp values")
        self.values = [_finite(v, "clamp value") for v in vals]

    def target(self, a: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.values, dtype=a.dtype, device=a.device).expand_as(a)


@dataclass(eq=False)
class Scale(_LatentEdit):
    """Multiply SAE latents by ``factor`` (error term kept)."""

    factor: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.factor = _finite(self.factor, "scale factor")

    def target(self, a: torch.Tensor) -> torch.Tensor:
        return a * self.factor


@dataclass(eq=False)
class AblateFeature(_LatentEdit):
    """Zero SAE latents (error term kept): ``x - a_f(x) * u_f``."""

    def target(self, a: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(a)


@dataclass(eq=False)
class Add(Intervention):
    """``x + alpha * v``; ``v`` is ``vector`` or, with ``sae`` + ``feature``, one unit of that latent."""

    vector: torch.Tensor | None = field(default=None, repr=False)
    alpha: float = 1.0
    sae: Any = field(default=None, repr=False)
    feature: int | None = None

    def __post_init__(self) -> None:
        self.alpha = _finite(self.alpha, "alpha")
        if self.vector is None:
            ensure(self.sae is not None and self.feature is not None, "Add needs a vector or an SAE and a feature")
            f = _check_features(self.sae, [self.feature])
            self.vector = latent_vectors(self.sae, f)[0]
            if self.layer is None:
                self.layer = sae_layer(self.sae)
        else:
            ensure(self.sae is None, "Add takes a vector or an SAE feature, not both")
        v = torch.as_tensor(self.vector, dtype=torch.float32).detach()
        ensure(v.ndim == 1, f"steering vector must be 1-D, got shape {tuple(v.shape)}")
        ensure(bool(torch.isfinite(v).all()), "steering vector contains NaN or inf")
        self.vector = v

    def prepare(self, model: nn.Module) -> None:
        self.layers(model)
        d = models.d_model(model)
        ensure(self.vector.shape[0] == d, f"steering vector has width {self.vector.shape[0]}, the model's is {d}")
        if self.sae is not None:
            check_sae_compatible(self.sae, model, int(self.layer) % models.n_layers(model))
        self.vector = self.vector.to(next(model.parameters()).device)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        return (self.alpha * self.vector).to(h.dtype).expand_as(h)


@dataclass(eq=False)
class AblateDirection(Intervention):
    """Project a direction out of the residual: ``x - (x . r) r`` (``layer=None``: embeddings + every layer)."""

    direction: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        ensure(self.direction is not None, "AblateDirection needs a direction")
        r = torch.as_tensor(self.direction, dtype=torch.float32).detach()
        ensure(r.ndim == 1, f"direction must be 1-D, got shape {tuple(r.shape)}")
        ensure(bool(torch.isfinite(r).all()), "direction contains NaN or inf")
        n = float(r.norm())
        ensure(n > 0, "cannot ablate a zero direction")
        self.direction = r / n

    def layers(self, model: nn.Module) -> list[int]:
        if self.layer is None:
            return list(range(models.n_layers(model)))
        return super().layers(model)

    def prepare(self, model: nn.Module) -> None:
        d = models.d_model(model)
        ensure(self.direction.shape[0] == d, f"direction has width {self.direction.shape[0]}, the model's is {d}")
        self.direction = self.direction.to(next(model.parameters()).device)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        r = self.direction.to(h.dtype)
        return -(h @ r).unsqueeze(-1) * r


Ablate = AblateFeature  # ARCHITECTURE.md name


# --------------------------------------------------------------------------------------------- hooks
class PositionTracker:
    """Reads the KV-cache length at each forward of the model body, to tell prompt from generated positions.

    A caller that feeds one prompt in several forwards (``saesteer.generation.decode.kvprefill``: a shared prefix, then the rest)
    tells it where the prompt ends with :meth:`set_prompt_len`."""

    def __init__(self) -> None:
        self.past = 0
        self.seq = 0
        self.prompt_len: int | None = None

    def pre_hook(self, _mod: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        x = ids if ids is not None else emb
        self.seq = int(x.shape[1]) if x is not None and x.ndim >= 2 else 0
        cache = kwargs.get("past_key_values")
        past = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length())
        self.past = past
        if past == 0:
            self.prompt_len = self.seq
        elif self.prompt_len is None:
            self.prompt_len = past

    def set_prompt_len(self, n: int) -> None:
        """Positions ``< n`` are prompt, whatever split the forwards that fill the cache use."""
        self.prompt_len = int(n)

    def mask(self, positions: str, seq: int) -> torch.Tensor | None:
        """``[seq]`` bool on the CPU (no device sync to test it), or None for every position."""
        if positions == "all":
            return None
        pos = torch.arange(self.past, self.past + seq)
        prompt_len = self.prompt_len if self.prompt_len is not None else seq
        return pos < prompt_len if positions == "prompt" else pos >= prompt_len


def _body(model: nn.Module) -> nn.Module:
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return body if isinstance(body, nn.Module) else model


@contextlib.contextmanager
def steer(model: nn.Module, interventions: Sequence[Intervention] | Intervention, positions: str = "all") -> Iterator[list]:
    """Install ``interventions`` as forward hooks for the duration of the ``with`` block; yields them.

    Interventions at the same layer apply in list order. Hooks are removed on exit, also on exceptions, and
    ``model._saesteer_interventions`` lists every live intervention (nested ``steer`` blocks stack).
    """
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    ivs = list(interventions)
    ensure(positions in POSITIONS, f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    for iv in ivs:
        ensure(isinstance(iv, Intervention), f"not an intervention: {type(iv).__name__}")
        p = iv.positions or positions
        ensure(p in POSITIONS, f"positions must be one of {', '.join(POSITIONS)}, got {p!r}")
        iv.prepare(model)
    tracker = PositionTracker()
    by_layer: dict[int, list[Intervention]] = {}
    embed_ivs: list[Intervention] = []
    for iv in ivs:
        for L in iv.layers(model):
            by_layer.setdefault(L, []).append(iv)
        if isinstance(iv, AblateDirection) and iv.layer is None:
            embed_ivs.append(iv)

    def make_hook(group: list[Intervention]):
        def hook(_mod: nn.Module, _inp: Any, out: Any) -> Any:
            h = models.layer_output(out)
            squeeze = h.ndim == 2
            x = h.unsqueeze(0) if squeeze else h
            for iv in group:
                x = iv.apply(x, tracker.mask(iv.positions or positions, x.shape[1]))
            x = x.squeeze(0) if squeeze else x
            return models.replace_layer_output(out, x)

        return hook

    handles = []
    previous = getattr(model, "_saesteer_interventions", None)
    try:
        handles.append(_body(model).register_forward_pre_hook(tracker.pre_hook, with_kwargs=True))
        for L, group in sorted(by_layer.items()):
            handles.append(models.hook_module(model, L).register_forward_hook(make_hook(group)))
        if embed_ivs:
            handles.append(model.get_input_embeddings().register_forward_hook(make_hook(embed_ivs)))
        model._saesteer_interventions = list(previous or []) + ivs
        yield ivs
    finally:
        for hd in handles:
            hd.remove()
        if previous is None:
            with contextlib.suppress(AttributeError):
                del model._saesteer_interventions
        else:
            model._saesteer_interventions = previous


def active_interventions(model: nn.Module) -> list[Intervention]:
    return list(getattr(model, "_saesteer_interventions", None) or [])


def select_rows(model: nn.Module, index: torch.Tensor) -> None:
    """Keep only rows ``index`` of every live intervention's per-row state (no-op when nothing is installed)."""
    for iv in active_interventions(model):
        iv.select_rows(index)


def set_row_scale(model: nn.Module, scale: torch.Tensor | Sequence[float] | None) -> None:
    """Set the same per-row scale on every live intervention."""
    for iv in active_interventions(model):
        iv.set_row_scale(scale)


# --------------------------------------------------------------------------------------------- serialisable spec
@dataclass
class SteeringSpec:
    """A JSON-serialisable steering config; ``build(model)`` turns it into interventions."""

    kind: str = "clamp"
    """One of clamp, add, scale, ablate_feature, ablate_direction."""
    sae: str | None = None
    """Path of the SAE (any format ``formats.load_sae`` reads); clamp / scale / ablate_feature / add of a latent."""
    features: list[int] = field(default_factory=list)
    """SAE latent indices (several at once for clamp / scale / ablate_feature; one for add)."""
    values: list[float] = field(default_factory=list)
    """Clamp values in latent units, one per feature (or one for all)."""
    factor: float = 1.0
    """Multiplier for ``scale``."""
    alpha: float = 1.0
    """Coefficient for ``add``."""
    direction: str | None = None
    """Path of a direction file (``direction.save_direction``) for add / ablate_direction."""
    layer: int | None = None
    """Layer to steer (default: the SAE's or the direction's layer; ablate_direction: None = every layer)."""
    positions: str = "all"
    """all / prompt / generated."""

    def __post_init__(self) -> None:
        ensure(self.kind in KINDS, f"unknown steering kind {self.kind!r} (expected one of {', '.join(KINDS)})")
        ensure(self.positions in POSITIONS, f"positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        self.features = [int(f) for f in (self.features if isinstance(self.features, (list, tuple)) else [self.features])]
        vals = self.values if isinstance(self.values, (list, tuple)) else [self.values]
        self.values = [_finite(v, "clamp value") for v in vals]
        self.alpha = _finite(self.alpha, "alpha")
        self.factor = _finite(self.factor, "scale factor")
        if self.kind in ("clamp", "scale", "ablate_feature"):
            ensure(self.sae is not None and self.features, f"a {self.kind} spec needs an SAE path and features")
        if self.kind == "clamp":
            ensure(bool(self.values), "a clamp spec needs values")
        if self.kind == "add":
            ensure(
                self.direction is not None or (self.sae is not None and len(self.features) == 1),
                "an add spec needs a direction file, or an SAE and exactly one feature",
            )
        if self.kind == "ablate_direction":
            ensure(self.direction is not None, "an ablate_direction spec needs a direction file")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SteeringSpec":
        ensure(isinstance(d, dict), f"a steering spec must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        ensure(not unknown, f"unknown steering spec field(s): {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise SaesteerError(f"bad steering spec: {e}") from None

    def build(self, model: nn.Module, sae_cache: dict[str, Any] | None = None) -> list[Intervention]:
        """Load the SAE / direction this spec names and return its interventions (``sae_cache`` reuses SAEs)."""
        pos = self.positions
        if self.kind in ("add", "ablate_direction") and self.direction is not None:
            from saesteer.steering import load_direction

            dvec = load_direction(self.direction)
            mm = models.model_name(model)
            ensure(not dvec.model or dvec.model == mm,
                   f"the direction {self.direction} was fitted on model {dvec.model!r}, not on {mm!r}")
            if self.kind == "add":
                layer = self.layer if self.layer is not None else dvec.layer
                return [Add(vector=dvec.vector, alpha=self.alpha, layer=layer, positions=pos)]
            return [AblateDirection(direction=dvec.vector, layer=self.layer, positions=pos)]
        sae = _load_sae_cached(self.sae, sae_cache)
        if self.kind == "clamp":
            return [Clamp(sae=sae, features=self.features, values=self.values, layer=self.layer, positions=pos)]
        if self.kind == "scale":
            return [Scale(sae=sae, features=self.features, factor=self.factor, layer=self.layer, positions=pos)]
        if self.kind == "ablate_feature":
            return [AblateFeature(sae=sae, features=self.features, layer=self.layer, positions=pos)]
        return [Add(sae=sae, feature=self.features[0], alpha=self.alpha, layer=self.layer, positions=pos)]


def _load_sae_cached(path: str | None, cache: dict[str, Any] | None) -> Any:
    ensure(path is not None, "no SAE path given")
    key = str(Path(path).expanduser().resolve())
    if cache is not None and key in cache:
        return cache[key]
    from saesteer.sae import load_sae

    sae = load_sae(path)
    if cache is not None:
        cache[key] = sae
    return sae


def load_specs(obj: Any) -> list[SteeringSpec]:
    """Specs from a JSON object, a list of them, ``{"steering": [...]}``, or a path to such a JSON file."""
    if isinstance(obj, (str, Path)):
        from saesteer.core import read_json

        obj = read_json(obj, "steering spec file")
    if isinstance(obj, dict) and "steering" in obj:
        obj = obj["steering"]
    items = obj if isinstance(obj, list) else [obj]
    ensure(len(items) > 0, "the steering spec list is empty")
    return [SteeringSpec.from_dict(d) for d in items]


def build_all(specs: Sequence[SteeringSpec], model: nn.Module) -> list[Intervention]:
    cache: dict[str, Any] = {}
    return [iv for s in specs for iv in s.build(model, cache)]

"""The serialisable steering spec (what to steer with: an SAE latent clamp / scale / ablation, an added or ablated
direction), building its interventions for a model, and :class:`Steering`: a named steering configuration — specs,
ready-made interventions or a policy — that every eval, the lm-eval model and the server run under."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

from torch import nn

from saesteer import models
from saesteer.core import SaesteerError, ensure

from .hooks import steer
from .interventions import KINDS, POSITIONS, AblateDirection, AblateFeature, Add, Clamp, Intervention, Scale, finite


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
        self.values = [finite(v, "clamp value") for v in vals]
        self.alpha = finite(self.alpha, "alpha")
        self.factor = finite(self.factor, "scale factor")
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
        sae = load_sae_cached(self.sae, sae_cache)
        if self.kind == "clamp":
            return [Clamp(sae=sae, features=self.features, values=self.values, layer=self.layer, positions=pos)]
        if self.kind == "scale":
            return [Scale(sae=sae, features=self.features, factor=self.factor, layer=self.layer, positions=pos)]
        if self.kind == "ablate_feature":
            return [AblateFeature(sae=sae, features=self.features, layer=self.layer, positions=pos)]
        return [Add(sae=sae, feature=self.features[0], alpha=self.alpha, layer=self.layer, positions=pos)]


def load_sae_cached(path: str | None, cache: dict[str, Any] | None) -> Any:
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


# --------------------------------------------------------------------------------------------- a named steering config
@dataclass
class Steering:
    """A named steering config for evals: SAE / direction specs, or a policy object (``.apply(model)``)."""

    name: str = "unsteered"
    """Recorded on every item (e.g. ``clamp f981=6``)."""
    specs: list[Any] = field(default_factory=list)
    """:class:`saesteer.steering.interventions.SteeringSpec` objects (built against the model on entry)."""
    interventions: list[Any] = field(default_factory=list)
    """Ready-made interventions (``steering.Clamp`` ...)."""
    policy: Any = None
    """A conditional-steering policy: ``policy.apply(model)`` is a context manager."""

    @property
    def gated(self) -> bool:
        return self.policy is not None

    @contextlib.contextmanager
    def context(self, model: Any) -> Iterator[Any]:
        with contextlib.ExitStack() as stack:
            ivs = list(self.interventions)
            if self.specs:
                ivs += build_all(self.specs, model)
            if ivs:
                stack.enter_context(steer(model, ivs))
            if self.policy is not None:
                stack.enter_context(self.policy.apply(model))
            yield self


def as_steering(steering: Any) -> Steering:
    """Normalise what callers pass as ``steering`` into a :class:`Steering`."""
    if steering is None:
        return Steering()
    if isinstance(steering, Steering):
        return steering
    if hasattr(steering, "apply") and callable(steering.apply):
        return Steering(name=str(getattr(steering, "name", None) or "policy"), policy=steering)
    items = list(steering) if isinstance(steering, (list, tuple)) else [steering]
    if all(isinstance(s, SteeringSpec) for s in items):
        return Steering(name=" + ".join(spec_name(s) for s in items), specs=items)
    if all(isinstance(s, Intervention) for s in items):
        return Steering(name=" + ".join(type(s).__name__.lower() for s in items), interventions=items)
    raise SaesteerError(f"cannot steer with {type(steering).__name__}: pass specs, interventions or a policy")


def with_strength(spec: SteeringSpec, multiplier: float) -> SteeringSpec:
    """A copy of ``spec`` at ``multiplier`` times its strength: clamp values, an add's ``alpha`` or a scale's
    ``factor`` multiplied (``saesteer sweep --policy``, the direction baseline's matched strength). Ablations have no
    strength: asking to change one is an error (1.0 returns an unchanged copy)."""
    import dataclasses

    m = finite(multiplier, "strength multiplier")
    if spec.kind == "clamp":
        return dataclasses.replace(spec, values=[v * m for v in spec.values])
    if spec.kind == "add":
        return dataclasses.replace(spec, alpha=spec.alpha * m)
    if spec.kind == "scale":
        return dataclasses.replace(spec, factor=spec.factor * m)
    ensure(m == 1.0, f"a {spec.kind} spec has no strength to scale")
    return dataclasses.replace(spec)


def spec_name(s: Any) -> str:
    """A short human name for a SteeringSpec (``clamp f981=6``, ``add dir x2``)."""
    if s.kind == "clamp":
        return "clamp " + ",".join(f"f{f}={v:g}" for f, v in zip(s.features, s.values * len(s.features)))
    if s.kind in ("add", "ablate_direction") and s.direction:
        return f"{s.kind} {Path(s.direction).stem}" + (f" x{s.alpha:g}" if s.kind == "add" else "")
    if s.kind == "scale":
        return "scale " + ",".join(f"f{f}" for f in s.features) + f" x{s.factor:g}"
    return f"{s.kind} " + ",".join(f"f{f}" for f in s.features) + (f" x{s.alpha:g}" if s.kind == "add" else "")

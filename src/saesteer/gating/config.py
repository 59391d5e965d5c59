"""Steering as users state it — an SAE with features and clamp values, a direction, a spec file or a policy file —
turned into one :class:`~saesteer.steering.Steering`. Every command's steering options (``cli/options.py``) and the
lm-eval model's ``model_args`` go through :func:`steering_from_options`, so they accept the same values and fail with
the same one-line errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from saesteer.core import SaesteerError, ensure
from saesteer.steering import Steering, SteeringSpec, load_specs, spec_name

from .policy import load_policy


def split_values(value: Any, cast: type, what: str) -> list:
    """``1,2`` / ``[1, 2]`` / ``["1,2", "3"]`` / ``1+2`` (lm-eval's model_args cannot hold commas) → ``[cast(x), ...]``."""
    if value is None or value == "":
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        for part in str(item).replace("+", ",").replace(";", ",").split(","):
            if part.strip():
                try:
                    out.append(cast(part.strip()))
                except ValueError:
                    raise SaesteerError(f"{what} must be {'integers' if cast is int else 'numbers'}, got {part!r}") from None
    return out


def steering_from_options(
    sae: str | os.PathLike | None = None, feature: Any = None, clamp: Any = None, alpha: float | None = None,
    direction: str | os.PathLike | None = None, ablate_direction: bool = False, layer: int | None = None,
    positions: str = "all", spec: str | os.PathLike | None = None, policy: str | os.PathLike | None = None,
    name: str | None = None,
) -> Steering | None:
    """The steering these options describe (None: unsteered).

    ``sae`` + ``feature`` + ``clamp`` (one value, or one per feature) clamps latents; ``sae`` + one ``feature`` +
    ``alpha`` adds that latent's decoder vector; ``direction`` adds a direction file (``alpha``, default 1) or with
    ``ablate_direction`` projects it out; ``spec`` adds the specs of a JSON file; ``policy`` adds a policy file (a gate and its own
    steering; combined with the other options, both apply).
    """
    feats = split_values(feature, int, "--feature")
    vals = split_values(clamp, float, "--clamp")
    specs: list[SteeringSpec] = list(load_specs(Path(spec))) if spec is not None else []
    if sae is not None:
        from saesteer.sae import sae_path_exists

        ensure(sae_path_exists(sae), f"SAE not found: {sae}")
        ensure(bool(feats), "--sae needs at least one --feature")
        if vals:
            ensure(len(vals) in (1, len(feats)), f"{len(feats)} features but {len(vals)} clamp values")
            specs.append(SteeringSpec(kind="clamp", sae=str(sae), features=feats, values=vals, layer=layer,
                                      positions=positions))
        else:
            ensure(alpha is not None and len(feats) == 1,
                   "with --sae give --clamp C (per feature) or --alpha A with one --feature")
            specs.append(SteeringSpec(kind="add", sae=str(sae), features=feats, alpha=float(alpha), layer=layer,
                                      positions=positions))
    else:
        ensure(not feats and not vals, "--feature / --clamp need --sae")
    if direction is not None:
        ensure(Path(direction).exists(), f"direction file not found: {direction}")
        if ablate_direction:
            specs.append(SteeringSpec(kind="ablate_direction", direction=str(direction), layer=layer,
                                      positions=positions))
        else:
            specs.append(SteeringSpec(kind="add", direction=str(direction), alpha=1.0 if alpha is None else float(alpha),
                                      layer=layer, positions=positions))
    else:
        ensure(not ablate_direction, "--ablate-direction needs --direction")
    pol = None
    if policy is not None:
        ensure(Path(policy).exists(), f"policy file not found: {policy}")
        pol = load_policy(policy)
    if not specs and pol is None:
        return None
    if layer is not None:
        for s in specs:
            s.layer = int(layer)
    parts = [spec_name(s) for s in specs] + ([f"policy {Path(policy).stem}"] if pol is not None else [])
    return Steering(name=name or " + ".join(parts), specs=specs, policy=pol)


def specs_from_options(**kw: Any) -> Sequence[SteeringSpec]:
    """Only the specs (e.g. a policy's own steering): :func:`steering_from_options` without a policy."""
    ensure(kw.get("policy") is None, "a policy cannot contain another policy")
    st = steering_from_options(**kw)
    return [] if st is None else list(st.specs)

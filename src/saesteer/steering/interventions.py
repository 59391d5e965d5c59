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
keeps the rows that remain when a generation loop drops finished rows (:func:`saesteer.steering.hooks.select_rows`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from saesteer import models
from saesteer.core import SaesteerError, ensure

POSITIONS = ("all", "prompt", "generated")
KINDS = ("clamp", "add", "scale", "ablate_feature", "ablate_direction")


def finite(x: float, what: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise SaesteerError(f"{what} must be a number, got {x!r}") from None
    ensure(math.isfinite(v), f"{what} must be finite, got {v}")
    return v


def check_sae_compatible(sae: Any, model: nn.Module, layer: int) -> None:
    """SAE width / layer / model must match the model it steers (:func:`saesteer.sae.check_compatible`)."""
    from saesteer.sae import check_compatible

    check_compatible(sae, model, layer)


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
        self.features = self.sae.check_features(self.features, unique=True)
        if self.layer is None:
            self.layer = self.sae.trained_layer
        self._vecs: torch.Tensor | None = None
        self._feat_t: torch.Tensor | None = None

    def prepare(self, model: nn.Module) -> None:
        layer = self.layers(model)[0]
        check_sae_compatible(self.sae, model, layer)
        dev = next(model.parameters()).device
        w = self.sae.W_dec
        if w.device != dev or w.dtype != torch.float32:  # SAE and clamp math in fp32 whatever the model's dtype
            self.sae.to(device=dev, dtype=torch.float32)
        self._vecs = self.sae.latent_vectors(self.features)
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
        self.values = [finite(v, "clamp value") for v in vals]

    def target(self, a: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.values, dtype=a.dtype, device=a.device).expand_as(a)


@dataclass(eq=False)
class Scale(_LatentEdit):
    """Multiply SAE latents by ``factor`` (error term kept)."""

    factor: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.factor = finite(self.factor, "scale factor")

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
        self.alpha = finite(self.alpha, "alpha")
        if self.vector is None:
            ensure(self.sae is not None and self.feature is not None, "Add needs a vector or an SAE and a feature")
            f = self.sae.check_features([self.feature])
            self.vector = self.sae.latent_vectors(f)[0]
            if self.layer is None:
                self.layer = self.sae.trained_layer
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

"""JumpReLU SAE (Gemma Scope, Gemma Scope 2, SAELens ``jumprelu``): ``a = ReLU(pre) · [pre > θ]`` with a per-latent
threshold θ; the activation of a latent is its thresholded value (0 at or below θ)."""

from __future__ import annotations

import torch
from torch import nn

from saesteer.sae.archs.base import ArchConfig, BaseSAE, register_arch


@register_arch("jumprelu")
class JumpReLUSAE(BaseSAE):
    def __init__(self, cfg: ArchConfig):
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.zeros(self.num_latents, dtype=self.W_enc.dtype))

    def extra_weights(self) -> dict[str, tuple[int, ...]]:
        return {"threshold": (self.num_latents,)}

    def _act(self, pre: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        th = self.threshold if features is None else self.threshold.index_select(0, features)
        return pre.relu() * (pre > th.to(pre.dtype)).to(pre.dtype)

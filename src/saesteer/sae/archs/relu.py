"""Standard SAE: ``a = ReLU(W_enc (x - b_dec) + b_enc)`` (SAELens ``standard``, dictionary_learning ``AutoEncoder``)."""

from __future__ import annotations

import torch

from saesteer.sae.archs.base import BaseSAE, register_arch


@register_arch("relu")
class ReLUSAE(BaseSAE):
    def _act(self, pre: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return pre.relu()

"""Top-k SAE with arbitrary decoder rows: ``a = TopK_k(ReLU(W_enc (x - b_dec) + b_enc))`` per token.

Our own :class:`saesteer.sae.model.TopKSAE` (unit decoder rows, input scale) is used whenever a file allows it; this class
covers published Top-k SAEs whose decoder rows are not unit-norm (SAELens ``topk`` without decoder-norm rescaling,
dictionary_learning ``AutoEncoderTopK``)."""

from __future__ import annotations

import torch

from saesteer.core import ensure
from saesteer.sae.archs.base import ArchConfig, BaseSAE, register_arch


@register_arch("topk")
class TopKDecSAE(BaseSAE):
    elementwise = False

    def __init__(self, cfg: ArchConfig):
        ensure(0 < int(cfg.k) <= int(cfg.num_latents), f"k must be in 1..num_latents, got k={cfg.k}")
        super().__init__(cfg)

    def _act(self, pre: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        vals, idx = pre.relu().topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, vals)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k ``(values, indices)`` sorted by value (width k)."""
        flat, lead = self._flat(x)
        vals, idx = torch.nn.functional.linear(self._enc_in(flat), self.W_enc, self.b_enc).relu().topk(self.k, dim=-1)
        return vals.reshape(*lead, self.k), idx.reshape(*lead, self.k)

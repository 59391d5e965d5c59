"""BatchTopK SAE (Bussmann et al. 2024; dictionary_learning ``BatchTopKSAE``). Training keeps the top ``k × batch``
activations of a batch; at inference the reference libraries use the learned global threshold instead, per token:
``a = ReLU(pre) · [ReLU(pre) > θ]`` (SAELens saves these as JumpReLU with θ repeated per latent). That is what
this class computes (``threshold`` is stored per latent; a scalar is broadcast by the loader)."""

from __future__ import annotations

from saesteer.sae.archs.base import register_arch
from saesteer.sae.archs.jumprelu import JumpReLUSAE


@register_arch("batchtopk")
class BatchTopKSAE(JumpReLUSAE):
    pass

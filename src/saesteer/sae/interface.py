"""What every SAE offers beyond its architecture's math: the layer it was trained on, feature-index checks and the
per-latent decoder vectors that steering adds. Mixed into :class:`~saesteer.sae.model.TopKSAE` and every published
architecture (:class:`~saesteer.sae.archs.base.BaseSAE`), which provide ``cfg``, ``num_latents`` and ``decode``."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from saesteer.core import SaesteerError, ensure


class SAEMethods:
    """Accessors shared by every SAE class (all values in the model's raw residual units)."""

    @property
    def latent_scale(self) -> float:
        """Raw-unit contribution of a latent value of 1 along its decoder row: 1.0 for every SAE here (input scales
        are folded into the weights)."""
        return 1.0

    @property
    def device(self) -> torch.device:
        return self.W_dec.device  # type: ignore[attr-defined]

    def decoder_direction(self, f: int) -> torch.Tensor:
        """Decoder row of latent ``f``: what one unit of its activation adds to the reconstruction (raw units; unit
        norm for our Top-k SAE)."""
        ensure(isinstance(f, int), f"feature index must be an integer, got {f!r}")
        self.check_features([f])
        return self.W_dec[f]  # type: ignore[attr-defined]

    @property
    def trained_layer(self) -> int | None:
        """The decoder layer whose output the SAE reads, or None when the SAE does not record one (stored as -1)."""
        layer = getattr(getattr(self, "cfg", None), "layer", None)
        return None if layer is None or int(layer) < 0 else int(layer)

    def require_layer(self) -> int:
        """:attr:`trained_layer`, or one error line asking for the layer when the SAE does not record it."""
        layer = self.trained_layer
        ensure(layer is not None, "the SAE does not record its layer; pass the layer explicitly")
        return int(layer)

    def check_features(self, features: Sequence[int], unique: bool = False) -> list[int]:
        """``features`` as ints, each in range (and, with ``unique``, without repeats); one error line otherwise."""
        feats = [int(f) for f in features]
        ensure(len(feats) > 0, "no SAE feature given")
        n = int(self.num_latents)  # type: ignore[attr-defined]
        for f in feats:
            ensure(0 <= f < n, f"feature index {f} is out of range: the SAE has {n} latents (0..{n - 1})")
        if unique:
            ensure(len(set(feats)) == len(feats), f"duplicate feature indices in {feats}")
        return feats

    def decode(self, top_acts: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
        """Reconstruction in raw units from sparse values / indices of any leading shape (a gather of decoder rows,
        ``embedding_bag``); ``b_dec`` is divided by the input scale folded into the weights (1 for published SAEs)."""
        if top_acts.shape != top_indices.shape:
            raise SaesteerError(f"top_acts {tuple(top_acts.shape)} and top_indices {tuple(top_indices.shape)} differ")
        n = int(self.num_latents)  # type: ignore[attr-defined]
        W = self.W_dec  # type: ignore[attr-defined]
        lead, kk = top_acts.shape[:-1], top_acts.shape[-1]
        idx = top_indices.reshape(-1, kk).long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise SaesteerError(f"latent index out of range 0..{n - 1}")
        out = F.embedding_bag(idx, W, per_sample_weights=top_acts.reshape(-1, kk).to(W.dtype), mode="sum")
        return (out + self.b_dec / self.input_scale).reshape(*lead, self.d_in)  # type: ignore[attr-defined]

    @torch.no_grad()
    def latent_vectors(self, features: Sequence[int]) -> torch.Tensor:
        """``[m, d_in]``: the change one unit of each latent makes to the SAE's reconstruction."""
        W = self.W_dec  # type: ignore[attr-defined]
        idx = torch.as_tensor(list(features), dtype=torch.long, device=W.device).unsqueeze(1)
        ones = torch.ones(idx.shape, dtype=W.dtype, device=idx.device)
        return self.decode(ones, idx) - self.decode(torch.zeros_like(ones), idx)  # type: ignore[attr-defined]

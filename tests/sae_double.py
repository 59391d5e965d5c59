"""A tied, orthonormal Top-k SAE for steering tests (the real ``saesteer.sae.model.TopKSAE`` when it exists)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


class _DoubleSAE(nn.Module):
    """Minimal Top-k SAE with the TopKSAE API and unit convention (raw-unit latents; used only without saesteer.sae.model)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.num_latents, cfg.d_in
        self.W_enc = nn.Parameter(torch.zeros(n, d))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.zeros(n, d))
        self.b_dec = nn.Parameter(torch.zeros(d))

    def pre_acts(self, x):
        return torch.relu((x * self.cfg.input_scale - self.b_dec) @ self.W_enc.T + self.b_enc) / self.cfg.input_scale

    def encode(self, x):
        return self.pre_acts(x).topk(self.cfg.k, dim=-1)

    def encode_dense(self, x):
        acts, idx = self.encode(x)
        return torch.zeros(*x.shape[:-1], self.cfg.num_latents, dtype=x.dtype).scatter(-1, idx, acts)

    def decode(self, acts, idx):
        return (acts.unsqueeze(-1) * self.W_dec[idx]).sum(-2) + self.b_dec / self.cfg.input_scale

    def forward(self, x):
        return self.decode(*self.encode(x))


def make_sae(d_in: int, num_latents: int, k: int, layer: int, model: str, seed: int = 0, input_scale: float = 0.5):
    """A Top-k SAE whose encoder rows equal its (orthonormal) decoder rows, so a clamped latent re-encodes exactly."""
    assert num_latents <= d_in
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d_in, num_latents, generator=g))
    try:
        from saesteer.sae import SAEConfig, TopKSAE

        sae = TopKSAE(SAEConfig(d_in=d_in, num_latents=num_latents, k=k, model=model, layer=layer,
                                input_scale=input_scale))
    except ImportError:
        sae = _DoubleSAE(SimpleNamespace(d_in=d_in, num_latents=num_latents, k=k, model=model, layer=layer,
                                         input_scale=input_scale))
    with torch.no_grad():
        sae.W_dec.copy_(q.T)
        sae.W_enc.copy_(q.T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
    return sae.eval()

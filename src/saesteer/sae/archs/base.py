"""The common interface of every SAE saesteer steers with, and the base class of the published architectures.

Every loaded SAE (our :class:`saesteer.sae.model.TopKSAE` and the classes registered here) offers, in the model's raw
residual units:

* ``d_in``, ``num_latents``, ``k`` (Top-k / BatchTopK k; 0 for ReLU / JumpReLU), ``arch``, ``source`` (file
  layout it came from), ``cfg`` with ``model``, ``layer`` (decoder layer whose *output* it reads; -1 unknown) and
  ``hook_name`` (the hook point as the source wrote it);
* ``encode_dense(x)`` ``[..., num_latents]``: the architecture's activation of every latent;
* ``latent_acts(x, features)`` ``[..., m]``: the same values for a few latents only (cheap where the activation is
  element-wise; what a clamp needs);
* ``encode(x)`` → ``(values, indices)`` of the active latents, sorted by value; the width is ``k`` for Top-k and
  the largest number of active latents in the batch otherwise (zero-padded);
* ``decode(values, indices)`` and ``decode_dense(acts)``: reconstruction (``Σ a_f W_dec[f] + b_dec``);
* ``W_enc`` ``[num_latents, d_in]`` and ``W_dec`` ``[num_latents, d_in]`` (rows: what one unit of a latent adds to
  the reconstruction), ``decoder_direction(f)`` (= ``W_dec[f]``), ``latent_scale`` (1.0);
* ``info()``: a JSON-able summary (``saesteer sae info``).

A latent edit ``x + (a_new - a_f(x)) * W_dec[f]`` with ``a_f`` from ``latent_acts`` therefore keeps the SAE's error
term for every architecture (for JumpReLU ``a_f`` is the thresholded value: 0 below the threshold).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from saesteer.core import SaesteerError, ensure

from ..interface import SAEMethods

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class ArchConfig:
    """Shape and provenance of a published SAE (``sae.cfg``)."""

    d_in: int
    num_latents: int
    arch: str = "relu"
    k: int = 0
    """Top-k / BatchTopK k (BatchTopK: the batch average used in training); 0 for ReLU / JumpReLU."""
    model: str = ""
    layer: int = -1
    """Decoder layer whose output (residual stream after that layer) the SAE reads; -1: unknown."""
    hook_name: str = ""
    """Hook point as the source names it (``blocks.L.hook_resid_post``, ``layers.L``, ...)."""
    source: str = ""
    """File layout it was loaded from: saelens, gemmascope, sparsify, dictionary_learning."""
    path: str = ""
    apply_b_dec_to_input: bool = True
    """Encoder input is ``x - b_dec`` (SAELens, sparsify, dictionary_learning) or ``x`` (Gemma Scope)."""
    dtype: str = "float32"

    def __post_init__(self) -> None:
        ensure(int(self.d_in) > 0, f"d_in must be positive, got {self.d_in}")
        ensure(int(self.num_latents) > 0, f"num_latents must be positive, got {self.num_latents}")
        ensure(self.dtype in _DTYPES, f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ARCHS: dict[str, type[BaseSAE]] = {}


def register_arch(name: str):
    """Class decorator: ``ARCHS[name] = cls`` (SAELens-style registry)."""

    def deco(cls: type[BaseSAE]) -> type[BaseSAE]:
        cls.arch = name
        ARCHS[name] = cls
        return cls

    return deco


def make_sae(arch: str, cfg: ArchConfig, weights: dict[str, torch.Tensor], device: str = "cpu") -> BaseSAE:
    """Build a registered architecture from ``W_enc [n, d]``, ``b_enc``, ``W_dec [n, d]``, ``b_dec`` (+ ``threshold``)."""
    ensure(arch in ARCHS, f"unknown SAE architecture {arch!r} (supported: {', '.join(sorted(ARCHS))})")
    cfg.arch = arch
    sae = ARCHS[arch](cfg)
    sae.load_weights(weights)
    return sae.to(device).eval()


class BaseSAE(SAEMethods, nn.Module):
    """Linear encoder, an element-wise (or per-token top-k) activation, linear decoder. Subclasses set ``_act``."""

    arch: ClassVar[str] = "base"
    elementwise: ClassVar[bool] = True
    """The activation of a latent depends only on its own pre-activation (latent_acts needs only those rows)."""

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.cfg = cfg
        n, d, dt = int(cfg.num_latents), int(cfg.d_in), _DTYPES[cfg.dtype]
        self.W_enc = nn.Parameter(torch.zeros(n, d, dtype=dt))
        self.b_enc = nn.Parameter(torch.zeros(n, dtype=dt))
        self.W_dec = nn.Parameter(torch.zeros(n, d, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=dt))

    # ----------------------------------------------------------------------------------------------- weights
    def extra_weights(self) -> dict[str, tuple[int, ...]]:
        """Architecture-specific tensors and their shapes (JumpReLU: the threshold)."""
        return {}

    @torch.no_grad()
    def load_weights(self, w: dict[str, torch.Tensor]) -> None:
        n, d = self.num_latents, self.d_in
        want = {"W_enc": (n, d), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,), **self.extra_weights()}
        where = self.cfg.path or "the SAE"
        for name, shape in want.items():
            ensure(name in w, f"SAE weights in {where} lack {name}")
            t = torch.as_tensor(w[name])
            ensure(tuple(t.shape) == shape, f"SAE weight {name} in {where} has shape {tuple(t.shape)}, expected {shape}")
            ensure(bool(torch.isfinite(t.float()).all()), f"SAE weight {name} in {where} contains NaN or Inf")
            getattr(self, name).copy_(t.to(getattr(self, name).dtype))

    # ----------------------------------------------------------------------------------------------- properties
    @property
    def d_in(self) -> int:
        return int(self.cfg.d_in)

    @property
    def num_latents(self) -> int:
        return int(self.cfg.num_latents)

    @property
    def k(self) -> int:
        return int(self.cfg.k)

    @property
    def source(self) -> str:
        return self.cfg.source

    @property
    def input_scale(self) -> float:
        return 1.0

    def info(self) -> dict[str, Any]:
        return sae_info(self)

    # ----------------------------------------------------------------------------------------------- math
    def _flat(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        if x.shape[-1] != self.d_in:
            raise SaesteerError(f"input width {x.shape[-1]} does not match the SAE's d_in {self.d_in}")
        return x.reshape(-1, self.d_in).to(self.W_enc.dtype), tuple(x.shape[:-1])

    def _enc_in(self, flat: torch.Tensor) -> torch.Tensor:
        return flat - self.b_dec if self.cfg.apply_b_dec_to_input else flat

    def _act(self, pre: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Activation of pre-activations ``pre [N, m]`` (``features``: which latents the columns are; None = all)."""
        raise NotImplementedError

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations (before the nonlinearity) of every latent ``[..., num_latents]``."""
        flat, lead = self._flat(x)
        return F.linear(self._enc_in(flat), self.W_enc, self.b_enc).reshape(*lead, self.num_latents)

    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Activations of every latent ``[..., num_latents]`` (zeros where inactive)."""
        flat, lead = self._flat(x)
        pre = F.linear(self._enc_in(flat), self.W_enc, self.b_enc)
        return self._act(pre).reshape(*lead, self.num_latents)

    def latent_acts(self, x: torch.Tensor, features: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Activations ``[..., m]`` of the latents ``features`` (the same values ``encode_dense`` gives them)."""
        feats = torch.as_tensor(features, dtype=torch.long, device=self.W_enc.device).reshape(-1)
        if not self.elementwise:
            return self.encode_dense(x).index_select(-1, feats)
        flat, lead = self._flat(x)
        pre = F.linear(self._enc_in(flat), self.W_enc.index_select(0, feats), self.b_enc.index_select(0, feats))
        return self._act(pre, feats).reshape(*lead, feats.numel())

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Active latents ``(values [..., w], indices [..., w])`` sorted by value; ``w`` = the largest number of
        active latents of any row (at least 1), rows with fewer are padded with zero values."""
        dense = self.encode_dense(x)
        w = max(1, int((dense != 0).sum(-1).max())) if dense.numel() else 1
        return dense.topk(min(w, self.num_latents), dim=-1)

    def decode_dense(self, acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``acts @ W_dec + b_dec`` from dense activations ``[..., num_latents]``."""
        return acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_dense(self.encode_dense(x)).to(x.dtype)


def sae_info(sae: Any) -> dict[str, Any]:
    """Architecture, width, hook point, layer, model and source of any loaded SAE."""
    cfg = getattr(sae, "cfg", None)
    layer = getattr(cfg, "layer", -1)
    return {
        "architecture": getattr(sae, "arch", getattr(cfg, "arch", "topk")),
        "num_latents": int(sae.num_latents),
        "d_in": int(sae.d_in),
        "k": int(getattr(sae, "k", 0) or 0),
        "hook_name": getattr(cfg, "hook_name", "") or "",
        "layer": int(layer) if layer is not None else -1,
        "model": getattr(cfg, "model", "") or "",
        "source": getattr(sae, "source", "") or getattr(cfg, "source", "") or "saesteer",
        "path": getattr(cfg, "path", "") or getattr(sae, "path", "") or "",
        "dtype": str(sae.W_dec.dtype).replace("torch.", ""),
    }
